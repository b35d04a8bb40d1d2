"""Leases with fencing tokens, signals, idempotent calls and the agent registry.

Each is built on items, compare-and-set and TTL (as DESIGN.md asks), in namespaces
reserved for hivemem (never listed, searched or watched by agents):

- ``_leases/<name>``: key ``token`` (no TTL, never deleted: its version is the last
  fencing token issued, so tokens only grow) and key ``holder`` (the current holder,
  with the lease's TTL). Acquiring writes both in one batch (``token`` at the version
  read, ``holder`` only if absent or expired); renewing and releasing check ``token``
  still has the holder's token, so a holder whose lease ran out cannot touch its
  successor's. A fenced item write carries a :class:`CheckWrite` of ``token`` at the
  writer's token in the same atomic batch.
- ``_signals/<name>``: key ``signal``; the item's version is the signal's.
- ``_once/agent/<agent>`` or ``_once/shared``: one item per key; a running call is a
  ``{"state": "running", "token": t}`` record with the runner's lease as TTL, replaced
  by ``done`` (with the result, TTL ``ttl``) or deleted on failure.
- ``_agents``: one item per registered agent (events ``agent.registered``,
  ``agent.heartbeat``, ``agent.up``, ``agent.down``, ``agent.unregistered``).
  A coordination round (every ``coordination_interval_seconds``, in every hive process)
  marks agents whose last heartbeat is older than their ttl as down with a
  compare-and-set, so exactly one ``agent.down`` event is written however many
  processes run the round.

Waits are woken by the feed's change signal (a commit here or a notification from
another process), never by a sleep loop.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Sequence
from typing import Any, cast

import orjson

from hivemem import validation as check
from hivemem.backends.base import Backend
from hivemem.backends.rows import CheckWrite, DeleteWrite, ItemRow, PutWrite
from hivemem.core.area import Area, timestamp
from hivemem.core.tasks import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from hivemem.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from hivemem.hive import Hive
from hivemem.models import AgentRecord, Lease, OnceTicket, Signal
from hivemem.validation import optional_wait, seconds

AGENTS = "_agents"
#: Most capabilities one registration lists.
MAX_CAPABILITIES = 64
#: How long a down agent's entry stays listed (seconds after its ttl ran out).
DOWN_KEPT_SECONDS = 86400.0
#: Most registrations one coordination round looks at.
REGISTRY_SCAN = 10_000


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _put(
    namespace: str,
    key: str,
    value: Any,
    *,
    if_version: int | None,
    expires_at: float | None = None,
    event: str | None = None,
) -> PutWrite:
    return PutWrite(namespace, key, _json(value), None, None, expires_at, if_version, event=event)


class CoordinationMixin(Area):
    """Leases, signals, idempotent calls and the registry of :class:`~hivemem.core.LocalHive`."""

    async def _write(
        self, writes: Sequence[PutWrite | DeleteWrite | CheckWrite], now: float
    ) -> list[ItemRow | bool]:
        return await self._backend.write_items(writes, author=self.agent, now=now, history_limit=0)

    async def _until_change(self, generation: int, left: float, due: float | None = None) -> None:
        """Wait for a change, ``left`` seconds, or until ``due`` (a time) at most."""
        if due is not None:
            left = min(left, max(0.0, due - self._now()) + 0.01)
        await self._backend.changes.wait(generation, min(left, self._settings.feed_poll_seconds))

    def _name(self, name: object, field: str = "name") -> str:
        if self._system and isinstance(name, str) and name.startswith("_hivemem/"):
            return name
        n = check.namespace(name, self._settings, field=field)
        self._must("tasks", n, field)
        return n

    # Leases --------------------------------------------------------------------------

    async def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease:
        n = self._name(name)
        hold = seconds(ttl, "ttl", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        deadline = self._now() + optional_wait(wait)
        ns = f"_leases/{n}"
        await self._ready()
        while True:
            generation = self._backend.changes.generation
            now = self._now()
            rows = {
                r.key: r
                for r in await self._backend.get_items([(ns, "token"), (ns, "holder")], now)
            }
            holder = rows.get("holder")
            if holder is None:
                fence = rows.get("token")
                last = 0 if fence is None else fence.version
                token = last + 1
                try:
                    _, row = await self._write(
                        [
                            _put(ns, "token", {"holder": self.agent}, if_version=last),
                            _put(
                                ns,
                                "holder",
                                {"holder": self.agent, "token": token, "ttl": hold},
                                if_version=0,
                                expires_at=now + hold,
                            ),
                        ],
                        now,
                    )
                except Conflict:
                    continue  # another acquire won the race; look again
                assert isinstance(row, ItemRow)
                return _lease(n, row)
            left = deadline - now
            if left <= 0:
                who = orjson.loads(holder.value).get("holder")
                raise Conflict(
                    f"lease {n!r} is held by {who!r} until "
                    f"{timestamp(holder.expires_at or now).isoformat()}",
                    field="name",
                )
            await self._until_change(generation, left, holder.expires_at)

    async def _holding(self, ns: str, token: int, version: int) -> dict[str, Any] | None:
        """The holder record of the lease in ``ns`` if this agent holds it at ``token``
        and holder ``version``, else None. A lease's token and version are small
        numbers another agent could guess, so the holder is checked too (the write that
        follows is a compare-and-set on the version)."""
        row = await self._backend.get_item(ns, "holder", self._now())
        if row is None or row.version != version:
            return None
        record = orjson.loads(row.value)
        if record.get("holder") != self.agent or record.get("token") != token:
            return None
        return dict(record)

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        n, token, version = _lease_parts(lease)
        self._name(n, "lease")
        if ttl is not None:
            seconds(ttl, "ttl", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        ns = f"_leases/{n}"
        await self._ready()
        now = self._now()
        lost = Conflict(
            f"lease {n!r} with token {token} is not held by {self.agent!r} (it ran out, "
            "another agent acquired it, or it is not this agent's)",
            field="lease",
        )
        record = await self._holding(ns, token, version)
        if record is None:
            raise lost
        if ttl is None:  # the lease's own ttl: the record's (the caller's copy may lack it)
            ttl = getattr(lease, "ttl", None) or record["ttl"]
        hold = seconds(ttl, "ttl", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        try:
            _, row = await self._write(
                [
                    CheckWrite(ns, "token", token),
                    _put(
                        ns,
                        "holder",
                        {"holder": self.agent, "token": token, "ttl": hold},
                        if_version=version,
                        expires_at=now + hold,
                    ),
                ],
                now,
            )
        except Conflict:
            raise lost from None
        assert isinstance(row, ItemRow)
        return _lease(n, row)

    async def release(self, lease: Lease) -> bool:
        n, token, version = _lease_parts(lease)
        self._name(n, "lease")
        ns = f"_leases/{n}"
        await self._ready()
        if await self._holding(ns, token, version) is None:
            return False
        try:
            await self._write(
                [CheckWrite(ns, "token", token), DeleteWrite(ns, "holder", version)], self._now()
            )
        except Conflict:
            return False
        return True

    def _fence(self, fence: object) -> CheckWrite:
        """The check a write fenced with ``fence`` = (lease name, token) carries.

        Raises:
            InvalidInput: not a (name, token) pair (field ``fence``).
        """
        if not isinstance(fence, tuple | list) or len(fence) != 2:
            raise InvalidInput("fence must be a (lease name, token) pair", field="fence")
        name, token = fence
        n = check.namespace(name, self._settings, field="fence")
        if isinstance(token, bool) or not isinstance(token, int) or token < 1:
            raise InvalidInput("fence token must be an integer >= 1", field="fence")
        return CheckWrite(f"_leases/{n}", "token", check.int64(token, "fence"))

    # Signals -------------------------------------------------------------------------

    async def set_signal(self, name: str, value: Any, *, ttl: float | None = None) -> Signal:
        n = self._name(name)
        data = check.to_json(value, "value", self._settings.max_payload_bytes)
        life = None if ttl is None else check.ttl(ttl, field="ttl", settings=self._settings)
        await self._ready()
        now = self._now()
        write = PutWrite(
            f"_signals/{n}", "signal", data, None, None, None if life is None else now + life, None
        )
        (row,) = await self._write([write], now)
        assert isinstance(row, ItemRow)
        return _signal(n, row)

    async def get_signal(
        self, name: str, *, changed_from: int | None = None, wait: float | None = None
    ) -> Signal | None:
        n = self._name(name)
        seen = None if changed_from is None else check.count(changed_from, field="changed_from")
        deadline = self._now() + optional_wait(wait)
        await self._ready()
        while True:
            generation = self._backend.changes.generation
            now = self._now()
            row = await self._backend.get_item(f"_signals/{n}", "signal", now)
            version = 0 if row is None else row.version
            left = deadline - now
            if seen is None or version != seen or left <= 0:
                return None if row is None else _signal(n, row)
            await self._until_change(generation, left, None if row is None else row.expires_at)

    # Idempotent calls ------------------------------------------------------------------

    def _once_place(self, key: object, shared: object) -> tuple[str, str]:
        k = check.key(key, self._settings, field="key")
        if not isinstance(shared, bool):
            raise InvalidInput("shared must be true or false", field="shared")
        self._coordinates("key")
        return ("_once/shared" if shared else f"_once/agent/{self.agent}"), k

    async def begin_once(
        self, key: str, *, shared: bool = False, lease: float = 60.0, wait: float | None = None
    ) -> OnceTicket:
        ns, k = self._once_place(key, shared)
        hold = seconds(lease, "lease", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        deadline = self._now() + optional_wait(wait)
        await self._ready()
        while True:
            generation = self._backend.changes.generation
            now = self._now()
            row = await self._backend.get_item(ns, k, now)
            if row is None:
                token = int.from_bytes(os.urandom(6), "big") + 1
                record = {"state": "running", "token": token, "holder": self.agent}
                try:
                    await self._write(
                        [_put(ns, k, record, if_version=0, expires_at=now + hold)], now
                    )
                except Conflict:
                    continue
                return OnceTicket(key=k, status="run", token=token, holder=self.agent)
            record = orjson.loads(row.value)
            if record["state"] == "done":
                return OnceTicket(
                    key=k, status="done", result=record.get("result"), holder=record.get("holder")
                )
            if record["state"] == "failed":
                return OnceTicket(
                    key=k, status="failed", error=record.get("error"), holder=record.get("holder")
                )
            left = deadline - now
            if left <= 0:
                return OnceTicket(key=k, status="running", holder=record.get("holder"))
            await self._until_change(generation, left, row.expires_at)

    async def _held_once(self, ns: str, key: str, token: object, now: float) -> ItemRow:
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidInput("token must be an integer", field="token")
        row = await self._backend.get_item(ns, key, now)
        record = {} if row is None else orjson.loads(row.value)
        if row is None or record.get("state") != "running" or record.get("token") != token:
            raise Conflict(
                f"key {key!r} is no longer held with token {token} (its lease ran out)",
                field="token",
            )
        return row

    async def renew_once(
        self, key: str, token: int, *, shared: bool = False, lease: float = 60.0
    ) -> None:
        ns, k = self._once_place(key, shared)
        hold = seconds(lease, "lease", low=MIN_LEASE_SECONDS, high=MAX_LEASE_SECONDS)
        await self._ready()
        now = self._now()
        row = await self._held_once(ns, k, token, now)
        try:
            await self._write(
                [PutWrite(ns, k, row.value, None, None, now + hold, row.version)], now
            )
        except Conflict:
            raise Conflict(
                f"key {k!r} is no longer held with token {token}", field="token"
            ) from None

    async def end_once(
        self,
        key: str,
        token: int,
        *,
        shared: bool = False,
        result: Any = None,
        error: str | None = None,
        keep_error: bool = False,
        ttl: float = 86400.0,
    ) -> None:
        ns, k = self._once_place(key, shared)
        life = check.ttl(ttl, field="ttl", settings=self._settings)
        if error is not None and not isinstance(error, str):
            raise InvalidInput("error must be a string", field="error")
        data = None
        if error is None:
            data = check.to_json(
                {"state": "done", "result": result, "holder": self.agent},
                "result",
                self._settings.max_value_bytes,
            )
        await self._ready()
        now = self._now()
        row = await self._held_once(ns, k, token, now)
        write: PutWrite | DeleteWrite
        if data is not None:
            write = PutWrite(ns, k, data, None, None, now + life, row.version)
        elif keep_error:
            record = {"state": "failed", "error": (error or "")[:4096], "holder": self.agent}
            write = _put(ns, k, record, if_version=row.version, expires_at=now + life)
        else:
            write = DeleteWrite(ns, k, row.version)
        try:
            await self._write([write], now)
        except Conflict:
            raise Conflict(
                f"key {k!r} is no longer held with token {token}", field="token"
            ) from None

    # Agent registry ----------------------------------------------------------------------

    def _coordinates(self, field: str) -> None:
        """Refuse a principal no rule grants ``tasks`` anywhere (idempotent calls and the
        registry belong to no namespace).

        Raises:
            PermissionDenied: naming ``field``.
        """
        if self._access is not None and not self._access.anywhere("tasks"):
            raise PermissionDenied(
                f"agent {self.agent!r} may not use coordination (no 'tasks' permission)",
                field=field,
            )

    def _agent_name(self, name: object) -> str:
        n = check.segment(name, "name", self._settings)
        self._coordinates("name")
        if (
            self._access is not None
            and n != self.agent
            and not self._access.allows("admin", AGENTS)
        ):
            raise PermissionDenied(
                f"agent {self.agent!r} may register only itself, not {n!r}", field="name"
            )
        return n

    async def register(
        self,
        name: str,
        *,
        capabilities: Sequence[str] = (),
        endpoint: str | None = None,
        metadata: dict[str, Any] | None = None,
        ttl: float = 15.0,
        heartbeat: bool = True,
    ) -> AgentRecord:
        n = self._agent_name(name)
        if isinstance(capabilities, str) or not isinstance(capabilities, Sequence):
            raise InvalidInput("capabilities must be a list of names", field="capabilities")
        if len(capabilities) > MAX_CAPABILITIES:
            raise InvalidInput(f"at most {MAX_CAPABILITIES} capabilities", field="capabilities")
        caps = sorted(
            {
                check.segment(c, f"capabilities.{i}", self._settings)
                for i, c in enumerate(capabilities)
            }
        )
        if endpoint is not None and (
            not isinstance(endpoint, str) or not 0 < len(endpoint) <= 2048
        ):
            raise InvalidInput(
                "endpoint must be a URL of at most 2048 characters", field="endpoint"
            )
        meta = (
            {}
            if metadata is None
            else orjson.loads(
                check.json_object(metadata, "metadata", self._settings.max_metadata_bytes)
            )
        )
        life = seconds(ttl, "ttl", low=1.0, high=MAX_LEASE_SECONDS)
        if not isinstance(heartbeat, bool):
            raise InvalidInput("heartbeat must be true or false", field="heartbeat")
        await self._ready()
        now = self._now()
        record = {
            "capabilities": caps,
            "endpoint": endpoint,
            "metadata": meta,
            "ttl": life,
            "registered_by": self.agent,
            "registered_at": now,
            "last_seen": now,
            "down": False,
        }
        (row,) = await self._write(
            [
                _put(
                    AGENTS,
                    n,
                    record,
                    if_version=None,
                    expires_at=now + life + DOWN_KEPT_SECONDS,
                    event="agent.registered",
                )
            ],
            now,
        )
        assert isinstance(row, ItemRow)
        if heartbeat:
            self._heartbeats.start(cast(Hive, self), n, life)  # a LocalHive
        return _agent(row, now)

    async def heartbeat_agent(self, name: str) -> AgentRecord:
        n = self._agent_name(name)
        await self._ready()
        while True:
            now = self._now()
            row = await self._backend.get_item(AGENTS, n, now)
            if row is None:
                raise NotFound(f"agent {n!r} is not registered", field="name")
            record = orjson.loads(row.value)
            event = "agent.up" if record["down"] else "agent.heartbeat"
            record.update(last_seen=now, down=False)
            try:
                (new,) = await self._write(
                    [
                        _put(
                            AGENTS,
                            n,
                            record,
                            if_version=row.version,
                            expires_at=now + record["ttl"] + DOWN_KEPT_SECONDS,
                            event=event,
                        )
                    ],
                    now,
                )
            except Conflict:
                continue
            assert isinstance(new, ItemRow)
            return _agent(new, now)

    async def unregister(self, name: str) -> bool:
        n = self._agent_name(name)
        self._heartbeats.stop(n)
        await self._ready()
        (deleted,) = await self._write(
            [DeleteWrite(AGENTS, n, None, event="agent.unregistered")], self._now()
        )
        return bool(deleted)

    async def agents(
        self, *, capability: str | None = None, healthy: bool | None = True
    ) -> builtins.list[AgentRecord]:
        if capability is not None:
            check.segment(capability, "capability", self._settings)
        if healthy is not None and not isinstance(healthy, bool):
            raise InvalidInput("healthy must be true, false or null", field="healthy")
        self._coordinates("capability")
        await self._ready()
        now = self._now()
        out = []
        for row in await _registrations(self._backend, now):
            record = _agent(row, now)
            if capability is not None and capability not in record.capabilities:
                continue
            if healthy is not None and record.healthy != healthy:
                continue
            out.append(record)
        return out


async def _registrations(backend: Backend, now: float) -> builtins.list[ItemRow]:
    rows: builtins.list[ItemRow] = []
    after = None
    while len(rows) < REGISTRY_SCAN:
        batch = await backend.list_items(AGENTS, after, 1000, now)
        rows.extend(batch)
        if len(batch) < 1000:
            break
        after = (batch[-1].namespace, batch[-1].key)
    return rows


async def mark_down(backend: Backend, now: float) -> int:
    """Mark registered agents whose last heartbeat is older than their ttl as down,
    each with one ``agent.down`` event (compare-and-set: concurrent rounds in other
    processes cannot write it twice). Returns how many were marked."""
    marked = 0
    for row in await _registrations(backend, now):
        record = orjson.loads(row.value)
        if record["down"] or record["last_seen"] + record["ttl"] > now:
            continue
        record["down"] = True
        try:
            await backend.write_items(
                [
                    _put(
                        AGENTS,
                        row.key,
                        record,
                        if_version=row.version,
                        expires_at=row.expires_at,
                        event="agent.down",
                    )
                ],
                author="hivemem",
                now=now,
                history_limit=0,
            )
            marked += 1
        except Conflict:
            pass  # a heartbeat or another process's round came first
    return marked


def _lease_parts(lease: object) -> tuple[str, int, int]:
    name, token, version = (getattr(lease, f, None) for f in ("name", "token", "version"))
    if not isinstance(name, str) or not isinstance(token, int) or not isinstance(version, int):
        raise InvalidInput("lease must be a Lease (from acquire)", field="lease")
    return name, token, version


def _lease(name: str, row: ItemRow) -> Lease:
    record = orjson.loads(row.value)
    assert row.expires_at is not None
    return Lease(
        name=name,
        token=record["token"],
        holder=record["holder"],
        ttl=record["ttl"],
        expires_at=timestamp(row.expires_at),
        version=row.version,
    )


def _signal(name: str, row: ItemRow) -> Signal:
    return Signal(
        name=name,
        value=orjson.loads(row.value),
        version=row.version,
        set_by=row.author,
        updated_at=timestamp(row.updated_at),
        expires_at=None if row.expires_at is None else timestamp(row.expires_at),
    )


def _agent(row: ItemRow, now: float) -> AgentRecord:
    r = orjson.loads(row.value)
    return AgentRecord(
        name=row.key,
        capabilities=r["capabilities"],
        endpoint=r["endpoint"],
        metadata=r["metadata"],
        ttl=r["ttl"],
        registered_by=r["registered_by"],
        registered_at=timestamp(r["registered_at"]),
        last_seen=timestamp(r["last_seen"]),
        healthy=not r["down"] and r["last_seen"] + r["ttl"] > now,
    )
