"""``HivememSaver``: LangGraph's checkpointer (``BaseCheckpointSaver``) on a hive.

Graphs compiled with ``checkpointer=HivememSaver(hive)`` keep their threads in hivemem, so
a run interrupted in one pod resumes in another, and every checkpoint is a hivemem item
with its version, author and feed event.

Layout (interface: ``langgraph.checkpoint.base.BaseCheckpointSaver``, langgraph-checkpoint
4.3), under ``prefix`` (default ``langgraph-checkpoints``):

- one hivemem namespace per (thread, checkpoint namespace):
  ``<prefix>/<thread>/<checkpoint_ns>`` (names escaped as
  :mod:`hivemem.integrations.labels` says; the root checkpoint namespace ``""`` is ``+``);
- in it, a checkpoint is the item ``c.<inverted id>``: LangGraph's ids are UUIDs
  (version 6, time-ordered), and each hex digit is inverted (``0``↔``f``), so hivemem's
  key order lists a namespace's checkpoints newest first and the latest is one
  ``list(..., limit=1)``. Its value holds the checkpoint without its channel values, the
  metadata (both as LangGraph's serializer's ``(type, bytes)``, base64) and the parent id;
- a channel value is the item ``b.<channel>.<version>``, written once per new version
  (``new_versions``), so a checkpoint stores only the channels that changed, as
  LangGraph's PostgreSQL saver does;
- a pending write is the item ``w.<checkpoint id>.<task id>.<index>``; regular writes are
  written only if absent (a retried ``put_writes`` changes nothing), the special ones
  (error, interrupt, scheduled, resume: negative indexes) are replaced.

``put`` writes the new channel values and then the checkpoint in one hivemem batch
(atomic; with more than 99 new channel values, the values first in batches, the
checkpoint last), so a checkpoint is never visible without its values.

Costs: ``get_tuple`` is a list of one key range, a get per channel and a list of the
checkpoint's writes; ``list`` reads the checkpoints of the namespaces asked for (every
namespace of the prefix when ``config`` is None) and filters metadata in the process;
``delete_for_runs`` reads every checkpoint under the prefix; ``delete_thread``,
``copy_thread`` and ``prune`` read every item of the threads named.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from hivemem import models
from hivemem.errors import Conflict
from hivemem.integrations._common import Bridge, every_item, every_namespace
from hivemem.integrations.labels import decode, encode_label, encode_part

if TYPE_CHECKING:
    from hivemem.hive import Hive
    from hivemem.sync import SyncHive

_BATCH = 100
_INVERT = str.maketrans("0123456789abcdef", "fedcba9876543210")
_ID = re.compile(r"[0-9a-f-]+")


def _inverted(checkpoint_id: str) -> str:
    """The key part that sorts checkpoint ids newest first (see the module notes)."""
    if not _ID.fullmatch(checkpoint_id):
        raise ValueError(
            f"checkpoint id {checkpoint_id!r} is not a lower-case UUID (as LangGraph makes)"
        )
    return checkpoint_id.translate(_INVERT)


def _b64(typed: tuple[str, bytes]) -> list[str]:
    return [typed[0], base64.b64encode(typed[1]).decode("ascii")]


def _unb64(stored: Sequence[str]) -> tuple[str, bytes]:
    return stored[0], base64.b64decode(stored[1])


class HivememSaver(BaseCheckpointSaver[str]):
    """LangGraph ``BaseCheckpointSaver`` on a hive (embedded or service).

    Args:
        hive: an async :class:`~hivemem.Hive` or a :class:`~hivemem.SyncHive`. The async
            methods (``graph.ainvoke``) work with either; the blocking ones
            (``graph.invoke``) need a SyncHive, or an async hive whose loop runs in another
            thread than the caller's.
        prefix: the hivemem namespace the threads are kept under.
        serde: LangGraph's serializer (default ``JsonPlusSerializer``).

    Every method may raise :class:`~hivemem.errors.Unavailable` (store or service down),
    :class:`~hivemem.errors.PermissionDenied` (the agent's policy forbids the prefix) and
    :class:`~hivemem.errors.TooLarge` (a channel value over the hive's ``max_value_bytes``,
    1 MiB by default, once serialized and base64-encoded).
    """

    def __init__(
        self,
        hive: Hive | SyncHive,
        *,
        prefix: str = "langgraph-checkpoints",
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self._bridge = Bridge(hive, "HivememSaver")
        self._hive = self._bridge.hive
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must be a hivemem namespace")
        self.prefix = prefix

    # Names -----------------------------------------------------------------------

    def _thread(self, thread_id: str) -> str:
        return f"{self.prefix}/{encode_label(str(thread_id))}"

    def _space(self, thread_id: str, checkpoint_ns: str) -> str:
        return f"{self._thread(thread_id)}/{encode_label(checkpoint_ns) if checkpoint_ns else '+'}"

    def _names(self, namespace: str) -> tuple[str, str]:
        """(thread_id, checkpoint_ns) of a namespace :meth:`_space` made."""
        thread, ns = namespace[len(self.prefix) + 1 :].split("/")
        return decode(thread), "" if ns == "+" else decode(ns)

    @staticmethod
    def _write_key(checkpoint_id: str, task_id: str, idx: int) -> str:
        return f"w.{checkpoint_id}.{encode_part(task_id)}.{idx}"

    # Blocking forms ------------------------------------------------------------------

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._bridge.blocking(fn, *args, **kwargs)

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._run(self.aget_tuple, config)  # type: ignore[no-any-return]

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> builtins.list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        yield from self._run(collect)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(self.aput, config, checkpoint, metadata, new_versions)  # type: ignore[no-any-return]

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._run(self.aput_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self._run(self.adelete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self.adelete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self.acopy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(self.aprune, thread_ids, strategy=strategy)

    # Reads -----------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``), or the thread's latest
        in ``checkpoint_ns`` (default ``""``); None if there is none."""
        conf = config["configurable"]
        thread_id, checkpoint_ns = str(conf["thread_id"]), conf.get("checkpoint_ns", "")
        space = self._space(thread_id, checkpoint_ns)
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id:
            item = await self._hive.get(space, f"c.{_inverted(checkpoint_id)}")
        else:
            page = await self._hive.list(space, key_prefix="c.", limit=1)
            item = page.items[0] if page.items else None
        if item is None:
            return None
        return await self._tuple(thread_id, checkpoint_ns, item.value)

    async def _tuple(
        self,
        thread_id: str,
        checkpoint_ns: str,
        stored: dict[str, Any],
        metadata: CheckpointMetadata | None = None,
    ) -> CheckpointTuple:
        space = self._space(thread_id, checkpoint_ns)
        checkpoint: Checkpoint = self.serde.loads_typed(_unb64(stored["checkpoint"]))
        versions = checkpoint.get("channel_versions", {})
        blobs, writes = await asyncio.gather(
            asyncio.gather(
                *(
                    self._hive.get(space, f"b.{encode_part(ch)}.{encode_part(str(v))}")
                    for ch, v in versions.items()
                )
            ),
            self._writes(space, stored["id"]),
        )
        values: dict[str, Any] = {}
        for channel, blob in zip(versions, blobs, strict=True):
            if blob is not None and "value" in blob.value:
                values[channel] = self.serde.loads_typed(_unb64(blob.value["value"]))
        parent = stored.get("parent")
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": checkpoint_ns,
                    "checkpoint_id": stored["id"],
                }
            },
            checkpoint={**checkpoint, "channel_values": values},
            metadata=(
                metadata
                if metadata is not None
                else self.serde.loads_typed(_unb64(stored["metadata"]))
            ),
            parent_config=(
                {
                    "configurable": {
                        "thread_id": thread_id,
                        "checkpoint_ns": checkpoint_ns,
                        "checkpoint_id": parent,
                    }
                }
                if parent
                else None
            ),
            pending_writes=[
                (w["task"], w["channel"], self.serde.loads_typed(_unb64(w["value"])))
                for w in writes
            ],
        )

    async def _writes(self, space: str, checkpoint_id: str) -> builtins.list[dict[str, Any]]:
        """The checkpoint's pending writes in LangGraph's ``writes_sort_key`` order."""
        found = [i.value async for i in self._items(space, key_prefix=f"w.{checkpoint_id}.")]
        found.sort(key=lambda w: (w["path"], w["task"], w["idx"]))
        return found

    def _items(self, prefix: str, *, key_prefix: str | None = None) -> AsyncIterator[Any]:
        return every_item(self._hive, prefix, key_prefix=key_prefix)

    async def _spaces(self, under: str) -> builtins.list[str]:
        """The checkpoint namespaces (hivemem namespaces of :meth:`_space`) under ``under``."""
        depth = self.prefix.count("/") + 3
        return [ns async for ns in every_namespace(self._hive, under) if ns.count("/") + 1 == depth]

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first within each (thread, checkpoint namespace): of the
        thread of ``config`` (of its ``checkpoint_ns`` when given, only its
        ``checkpoint_id`` when given), or of every thread when ``config`` is None;
        ``filter`` keeps those whose metadata has each key equal; ``before`` those with
        an older id; at most ``limit``."""
        if config is None:
            spaces = await self._spaces(self.prefix)
            only_id = None
        else:
            conf = config["configurable"]
            thread_id = str(conf["thread_id"])
            if conf.get("checkpoint_ns") is not None:
                spaces = [self._space(thread_id, conf["checkpoint_ns"])]
            else:
                spaces = await self._spaces(self._thread(thread_id))
            only_id = get_checkpoint_id(config)
        before_id = get_checkpoint_id(before) if before else None
        left = limit
        for space in spaces:
            thread_id, checkpoint_ns = self._names(space)
            async for item in self._items(space, key_prefix="c."):
                stored = item.value
                if only_id and stored["id"] != only_id:
                    continue
                if before_id and stored["id"] >= before_id:
                    continue
                metadata = self.serde.loads_typed(_unb64(stored["metadata"]))
                if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                    continue
                if left is not None:
                    if left <= 0:
                        return
                    left -= 1
                yield await self._tuple(thread_id, checkpoint_ns, stored, metadata)

    # Writes ----------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store ``checkpoint`` with its metadata and the channel values of
        ``new_versions``; returns the config naming it."""
        conf = config["configurable"]
        thread_id, checkpoint_ns = str(conf["thread_id"]), conf.get("checkpoint_ns", "")
        space = self._space(thread_id, checkpoint_ns)
        rest = dict(checkpoint)
        values: dict[str, Any] = rest.pop("channel_values", {})  # type: ignore[assignment]
        ops: builtins.list[models.PutOp | models.DeleteOp] = []
        for channel, version in new_versions.items():
            blob: dict[str, Any] = (
                {"value": _b64(self.serde.dumps_typed(values[channel]))}
                if channel in values
                else {"empty": True}
            )
            ops.append(
                models.PutOp(
                    namespace=space,
                    key=f"b.{encode_part(channel)}.{encode_part(str(version))}",
                    value=blob,
                )
            )
        stored = {
            "id": checkpoint["id"],
            "parent": conf.get("checkpoint_id"),
            "checkpoint": _b64(self.serde.dumps_typed(rest)),
            "metadata": _b64(self.serde.dumps_typed(get_checkpoint_metadata(config, metadata))),
        }
        run_id = metadata.get("run_id") or (config.get("metadata") or {}).get("run_id")
        ops.append(
            models.PutOp(
                namespace=space,
                key=f"c.{_inverted(checkpoint['id'])}",
                value=stored,
                metadata={"run_id": str(run_id)} if run_id else None,
            )
        )
        while len(ops) > _BATCH:  # the values first; the checkpoint commits last
            await self._hive.batch(ops[: _BATCH - 1])
            ops = ops[_BATCH - 1 :]
        await self._hive.batch(ops)
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes for the checkpoint ``config`` names: each regular write
        once (if absent), the special channels' writes replaced."""
        conf = config["configurable"]
        space = self._space(str(conf["thread_id"]), conf.get("checkpoint_ns", ""))
        checkpoint_id = conf["checkpoint_id"]
        ops: dict[str, models.PutOp] = {}
        for i, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, i)
            key = self._write_key(checkpoint_id, task_id, idx)
            ops[key] = models.PutOp(
                namespace=space,
                key=key,
                value={
                    "task": task_id,
                    "path": task_path,
                    "channel": channel,
                    "idx": idx,
                    "value": _b64(self.serde.dumps_typed(value)),
                },
                if_version=0 if idx >= 0 else None,
            )
        todo = list(ops.values())
        while todo:
            chunk, todo = todo[:_BATCH], todo[_BATCH:]
            while chunk:
                try:
                    await self._hive.batch(chunk)
                    break
                except Conflict as exc:  # a regular write already stored: keep it
                    at = _op_index(exc.field, len(chunk))
                    if at is None:
                        raise
                    chunk = chunk[:at] + chunk[at + 1 :]

    async def _delete_all(self, keys: Sequence[tuple[str, str]]) -> None:
        ops: builtins.list[models.PutOp | models.DeleteOp] = [
            models.DeleteOp(namespace=ns, key=key) for ns, key in keys
        ]
        for start in range(0, len(ops), _BATCH):
            await self._hive.batch(ops[start : start + _BATCH])

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, channel value and write of the thread."""
        under = self._thread(str(thread_id))
        await self._delete_all([(i.namespace, i.key) async for i in self._items(under)])

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints made by these runs (metadata ``run_id``) with their
        writes, in every thread (channel values other checkpoints share are kept)."""
        runs = {str(r) for r in run_ids}
        if not runs:
            return
        doomed: builtins.list[tuple[str, str]] = []
        for space in await self._spaces(self.prefix):
            async for item in self._items(space, key_prefix="c."):
                if item.metadata.get("run_id") in runs:
                    doomed.append((space, item.key))
                    doomed += [
                        (space, self._write_key(item.value["id"], w["task"], w["idx"]))
                        for w in await self._writes(space, item.value["id"])
                    ]
        await self._delete_all(doomed)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, channel value and write of one thread to another
        (replacing what the target holds at the same keys)."""
        source, target = self._thread(str(source_thread_id)), self._thread(str(target_thread_id))
        ops: builtins.list[models.PutOp | models.DeleteOp] = []
        async for item in self._items(source):
            ops.append(
                models.PutOp(
                    namespace=target + item.namespace[len(source) :],
                    key=item.key,
                    value=item.value,
                    metadata=item.metadata or None,
                )
            )
        # Channel values and writes before the checkpoints that refer to them.
        ops.sort(key=lambda op: op.key.startswith("c."))
        for start in range(0, len(ops), _BATCH):
            await self._hive.batch(ops[start : start + _BATCH])

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``keep_latest``: keep only each checkpoint namespace's latest checkpoint, its
        writes and the channel values it refers to; ``delete``: delete the threads."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}: keep_latest or delete")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.adelete_thread(thread_id)
                continue
            for space in await self._spaces(self._thread(str(thread_id))):
                doomed: builtins.list[tuple[str, str]] = []
                keep: set[str] = set()
                latest: str | None = None
                items = [i async for i in self._items(space)]
                for item in items:  # checkpoints come newest first
                    if item.key.startswith("c.") and latest is None:
                        latest = item.value["id"]
                        rest = self.serde.loads_typed(_unb64(item.value["checkpoint"]))
                        keep = {
                            f"b.{encode_part(ch)}.{encode_part(str(v))}"
                            for ch, v in rest.get("channel_versions", {}).items()
                        }
                        keep.add(item.key)
                for item in items:
                    if item.key in keep:
                        continue
                    if latest is not None and item.key.startswith(f"w.{latest}."):
                        continue
                    doomed.append((space, item.key))
                await self._delete_all(doomed)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """LangGraph's version scheme of its own savers: a zero-padded counter, then a
        random fraction (``"00000000000000000000000000000002.0.4175..."``)."""
        import random

        if current is None:
            n = 0
        elif isinstance(current, int):
            n = current
        else:
            n = int(current.split(".")[0])
        return f"{n + 1:032}.{random.random():016}"


def _op_index(field: str | None, ops: int) -> int | None:
    """The op index in a batch Conflict's field (``ops.3.if_version`` → 3; a batch of one
    op names ``if_version`` alone)."""
    if field == "if_version" and ops == 1:
        return 0
    if field:
        m = re.match(r"ops\.(\d+)\.", field)
        if m:
            return int(m.group(1))
    return None


__all__ = ["HivememSaver"]
