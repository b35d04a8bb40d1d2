"""Where each record lives in the DynamoDB table, and how rows become records.

One table, keys ``pk`` (partition) and ``sk`` (sort), both strings:

======================  ==============================  ====================================
record                  pk                              sk
======================  ==============================  ====================================
head (feed, gen, trim)  ``H``                           ``-``
item (current version)  ``I#<first segment>``           ``<namespace>\\0<key>``
namespace tree root     ``R``                           ``<first segment>``
past version            ``V#<incarnation>``             version, 12 digits
feed events             ``F#<seq // 10,000>``           first seq of the commit, 20 digits
session                 ``S``                           ``<session id>``
message                 ``M#<incarnation>``             seq, 12 digits
request id result       ``RQ#<request id>``             ``-``
due index               ``D#i`` items, ``D#s`` sessions, ``D#r`` request ids:
                        sk = due time (20 chars, 6 decimals) ``\\0`` what is due
vector waiting          ``P#<model>``                   ``<namespace>\\0<key>``
value chunks            ``C#<chunk group>``             chunk number, 4 digits
======================  ==============================  ====================================

Namespaces and keys hold no control characters (validation), so ``\\0`` separates
them and sorts a namespace's items before those of the namespaces under it. An
incarnation is a random id an item (or session) gets when it is created: versions
(messages) of a deleted item (session) stay unreachable when the key is used again,
and are removed after the delete commits.

A row larger than :data:`SPILL_BYTES` (DynamoDB takes 400 KB per item) has its large
attributes moved, zlib-compressed, to chunk rows written in the same transaction (``_ck`` names the
chunk group, ``_cf`` the fields it holds, ``_cn`` how many chunks).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from typing import Any

from hivemem.backends.rows import EventRow, ItemRow, MessageRow, SessionRow

#: A row whose str and bytes attributes exceed this many bytes spills into chunks.
SPILL_BYTES = 300_000
#: Bytes per chunk row.
CHUNK_BYTES = 350_000


#: DynamoDB's limits on a sort key and a partition key, in bytes of UTF-8.
SORT_KEY_BYTES = 1024
PARTITION_KEY_BYTES = 2048


def fit(text: str, limit: int = SORT_KEY_BYTES) -> str:
    """``text`` if it fits a key of ``limit`` bytes; else its first bytes (cut at a
    character boundary) then ``\x01`` and 32 hex digits of its SHA-256. Keys that long
    (a deep namespace and a long key) sort by that prefix, then by the hash: listing
    stays a total order that pages consistently, but among such keys it is not the
    (namespace, key) order."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    head = raw[: limit - 40].decode("utf-8", "ignore")
    return f"{head}\x01{hashlib.sha256(raw).hexdigest()[:32]}"


def root_of(namespace: str) -> str:
    """The first segment of a namespace."""
    return namespace.split("/", 1)[0]


def item_key(namespace: str, key: str) -> tuple[str, str]:
    """(pk, sk) of an item's row."""
    return f"I#{root_of(namespace)}", fit(f"{namespace}\0{key}")


def version_key(inc: str, version: int) -> tuple[str, str]:
    """(pk, sk) of a past version's row."""
    return f"V#{inc}", f"{version:012d}"


def message_key(inc: str, seq: int) -> tuple[str, str]:
    """(pk, sk) of a session message's row."""
    return f"M#{inc}", f"{seq:012d}"


def due_sk(at: float, what: str) -> str:
    """The sort key of a due-index row: ``at`` (UNIX seconds) then what is due."""
    return fit(f"{max(at, 0.0):020.6f}\0{what}")


def new_id() -> str:
    """A fresh incarnation or chunk-group id."""
    return uuid.uuid4().hex


def _size(row: dict[str, Any]) -> int:
    return sum(
        len(v.encode("utf-8")) if isinstance(v, str) else len(v)
        for v in row.values()
        if isinstance(v, str | bytes)
    )


def spill(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Move the large str/bytes attributes of ``row`` (in place) to chunk rows, which
    are returned, when the row is over :data:`SPILL_BYTES`; else nothing."""
    if _size(row) <= SPILL_BYTES:
        return []
    fields = sorted(
        (k for k, v in row.items() if k not in ("pk", "sk") and isinstance(v, str | bytes)),
        key=lambda k: -len(row[k]),
    )
    moved: list[str] = []
    for name in fields:
        moved.append(name)
        rest = {k: v for k, v in row.items() if k not in moved}
        if _size(rest) <= SPILL_BYTES // 2:
            break
    blob = bytearray()
    for name in moved:
        value = row.pop(name)
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        tag = b"s" if isinstance(value, str) else b"b"
        nb = name.encode("utf-8")
        blob += struct.pack(">H", len(nb)) + nb + tag + struct.pack(">Q", len(raw)) + raw
    blob = bytearray(zlib.compress(bytes(blob), 1))
    group = new_id()
    chunks = [
        {"pk": f"C#{group}", "sk": f"{i:04d}", "d": bytes(blob[at : at + CHUNK_BYTES])}
        for i, at in enumerate(range(0, len(blob), CHUNK_BYTES))
    ]
    row["_ck"] = group
    row["_cn"] = len(chunks)
    return chunks


def unspill(row: dict[str, Any], chunks: list[bytes]) -> dict[str, Any]:
    """``row`` with the attributes its chunks hold put back."""
    blob = zlib.decompress(b"".join(chunks))
    out = {k: v for k, v in row.items() if k not in ("_ck", "_cn")}
    at = 0
    while at < len(blob):
        (n,) = struct.unpack_from(">H", blob, at)
        at += 2
        name = blob[at : at + n].decode("utf-8")
        at += n
        tag = blob[at : at + 1]
        at += 1
        (size,) = struct.unpack_from(">Q", blob, at)
        at += 8
        raw = blob[at : at + size]
        at += size
        out[name] = raw.decode("utf-8") if tag == b"s" else bytes(raw)
    return out


def chunk_keys(row: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The keys of the chunk rows ``row`` refers to (none when it did not spill)."""
    if not row or "_ck" not in row:
        return []
    return [(f"C#{row['_ck']}", f"{i:04d}") for i in range(int(row["_cn"]))]


# Records -------------------------------------------------------------------------------

ITEM_FIELDS = ("ns", "key", "v", "ver", "au", "ca", "ua", "ex", "tx", "md")


def item_from(row: dict[str, Any]) -> ItemRow:
    """The :class:`ItemRow` of an item or version row (chunks already put back)."""
    return ItemRow(
        row["ns"],
        row["key"],
        row["v"],
        int(row["ver"]),
        row["au"],
        float(row["ca"]),
        float(row["ua"]),
        float(row["ex"]) if row.get("ex") is not None else None,
        row.get("tx"),
        row.get("md"),
    )


def live(row: dict[str, Any] | None, now: float) -> bool:
    """Whether an item row exists and has not expired at ``now``."""
    return row is not None and (row.get("ex") is None or float(row["ex"]) > now)


def session_from(row: dict[str, Any]) -> SessionRow:
    """The :class:`SessionRow` of a session row."""
    return SessionRow(
        row["sk"],
        row["app"],
        row.get("user"),
        row.get("agent"),
        row["by"],
        row["md"],
        row["st"],
        int(row["sv"]),
        int(row["nm"]),
        int(row["tu"]),
        int(row["ti"]),
        int(row["to"]),
        float(row["co"]),
        float(row["sa"]),
        float(row["la"]),
        float(row["ttl_s"]) if row.get("ttl_s") is not None else None,
    )


def session_to(row: SessionRow, inc: str) -> dict[str, Any]:
    """The table row of a session (``inc``: its messages' incarnation)."""
    return {
        "pk": "S",
        "sk": row.id,
        "app": row.app,
        "user": row.user,
        "agent": row.agent,
        "by": row.created_by,
        "md": row.metadata,
        "st": row.state,
        "sv": row.state_version,
        "nm": row.messages,
        "tu": row.turns,
        "ti": row.tokens_in,
        "to": row.tokens_out,
        "co": float(row.cost),
        "sa": float(row.started_at),
        "la": float(row.last_activity_at),
        "ttl_s": row.ttl,
        "inc": inc,
    }


def session_live(row: dict[str, Any] | None, now: float) -> bool:
    """Whether a session row exists and has not expired at ``now``."""
    if row is None:
        return False
    ttl = row.get("ttl_s")
    return ttl is None or float(row["la"]) + float(ttl) > now


def message_from(session_id: str, row: dict[str, Any]) -> MessageRow:
    """The :class:`MessageRow` of a message row."""
    return MessageRow(
        session_id,
        int(row["seq"]),
        row["role"],
        row["c"],
        row["au"],
        float(row["at"]),
        int(row["ti"]),
        int(row["to"]),
        float(row["co"]),
        row["md"],
    )


def events_from(row: dict[str, Any]) -> list[EventRow]:
    """The events of one feed row (one commit), in order."""
    first = int(row["sk"])
    return [
        EventRow(
            str(first + i),
            e["t"],
            e["n"],
            e.get("k"),
            int(e["v"]) if e.get("v") is not None else None,
            e["a"],
            float(e["at"]),
            e.get("d"),
        )
        for i, e in enumerate(row["ev"])
    ]
