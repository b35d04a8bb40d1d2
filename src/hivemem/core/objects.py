"""Object stores: S3 or a local directory, named by a URL.

The blob store of large values (:mod:`hivemem.core.blobs`) and the session archives of
``hivemem session export/import`` write whole objects through one small interface,
:class:`ObjectStore`: put, get (whole or its first bytes), delete, and a scan in name
order with each object's modification time.

URLs:

- ``s3://bucket[/prefix][?endpoint=URL&region=NAME]``: objects ``prefix/<name>`` in
  ``bucket``, through aiobotocore (the ``aws`` extra, imported on first use).
  ``endpoint`` names an S3-compatible server (moto, MinIO; path-style addressing is
  used then) and ``region`` the bucket's region; without them botocore's own
  configuration applies (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``~/.aws``), and so do
  its credentials (environment, profile, instance role).
- ``file:///abs/dir`` or a plain directory path: objects are files ``dir/<name>``,
  written to a temporary file beside the target, fsynced and renamed over it (atomic:
  a reader sees the whole object or none), then the directory is fsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hivemem.errors import InvalidInput, Unavailable

__all__ = [
    "DirectoryStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "object_target",
    "open_object_store",
]

#: Most keys one S3 DeleteObjects or ListObjectsV2 call handles.
_S3_PAGE = 1000
#: Suffix of the temporary files of a directory store (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object of a scan: its name (relative to the store), when it was last
    written (UNIX seconds, the store's clock) and its size in bytes."""

    name: str
    modified: float
    size: int


class ObjectStore(ABC):
    """Whole objects by name (``a/b`` style names; see the module notes).

    Every method raises :class:`~hivemem.errors.Unavailable` naming ``field`` (the
    setting or option the store came from) when the store cannot be reached or refuses.
    """

    #: The URL the store was opened from.
    url: str
    #: The input the store's errors name (``blob_store``, ``to``, ``from``).
    field: str

    @abstractmethod
    async def put(self, name: str, data: bytes) -> None:
        """Write ``data`` as object ``name``, replacing any object of that name."""

    @abstractmethod
    async def get(self, name: str) -> bytes | None:
        """Object ``name``'s bytes, or None when there is none."""

    @abstractmethod
    async def head(self, name: str, length: int) -> bytes | None:
        """The first ``length`` bytes (fewer if the object is shorter), or None."""

    @abstractmethod
    async def delete(self, names: Sequence[str]) -> None:
        """Remove the objects ``names``; an absent one is no error."""

    @abstractmethod
    async def scan(self, after: str, limit: int) -> list[ObjectInfo]:
        """Up to ``limit`` objects whose names sort after ``after`` ("" = from the
        start), in name order (bytewise)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections (the store may be used again afterwards)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_object_store(url: str, *, field: str = "blob_store") -> ObjectStore:
    """The store a URL names (see the module notes); nothing is contacted yet.

    Raises:
        InvalidInput: a malformed URL, an unknown query parameter, or ``s3://`` without
            aiobotocore installed (field ``field``).
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"{field} must be an s3:// URL or a directory", field=field)
    if url.startswith("s3://"):
        bucket, prefix, endpoint, region = _s3_parts(url, field)
        return S3Store(bucket, prefix, endpoint=endpoint, region=region, url=url, field=field)
    return DirectoryStore(_directory(url, field), url=url, field=field)


def object_target(url: str, *, field: str) -> tuple[ObjectStore, str]:
    """One object a URL names (a session archive): ``s3://bucket/key[?...]`` or a file
    path / ``file://`` URL. Returns the store holding it and its name there.

    Raises:
        InvalidInput: a malformed URL, an ``s3://`` URL without a key, or a path naming
            a directory (field ``field``).
    """
    if url.startswith("s3://"):
        bucket, key, endpoint, region = _s3_parts(url, field)
        if not key:
            raise InvalidInput(f"{field}: {url!r} names a bucket, not an object", field=field)
        store = S3Store(bucket, "", endpoint=endpoint, region=region, url=url, field=field)
        return store, key
    path = _directory(url, field)
    if path.is_dir():
        raise InvalidInput(f"{field}: {str(path)!r} is a directory, not a file", field=field)
    return DirectoryStore(path.parent, url=url, field=field), path.name


def _s3_parts(url: str, field: str) -> tuple[str, str, str | None, str | None]:
    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket or "@" in bucket:
        raise InvalidInput(f"{field}: {url!r} needs s3://bucket[/prefix]", field=field)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"endpoint", "region"})
    if unknown:
        raise InvalidInput(
            f"{field}: unknown parameter {unknown[0]!r} in {url!r} (endpoint, region)",
            field=field,
        )
    endpoint = query.get("endpoint", [None])[-1] or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise InvalidInput(f"{field}: endpoint must be an http(s):// URL", field=field)
    region = query.get("region", [None])[-1] or None
    if _missing_module("aiobotocore"):
        raise InvalidInput(
            f"{field}: s3:// needs aiobotocore: pip install 'hivemem[aws]'", field=field
        )
    return bucket, unquote(parts.path).strip("/"), endpoint, region


def _missing_module(module: str) -> bool:
    """Whether ``module`` cannot be imported (looked up, not imported)."""
    return importlib.util.find_spec(module) is None


def _directory(url: str, field: str) -> Path:
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query:
            raise InvalidInput(f"{field}: {url!r} must be file:///absolute/path", field=field)
        return Path(unquote(parts.path))
    if "://" in url:
        raise InvalidInput(
            f"{field}: {url!r} is neither s3://, file:// nor a directory path", field=field
        )
    return Path(url).expanduser().absolute()


def _unavailable(store: ObjectStore, what: str, exc: BaseException) -> Unavailable:
    return Unavailable(
        f"{store.field} {store.url}: {what} failed: {type(exc).__name__}: {exc}",
        field=store.field,
    )


# S3 ------------------------------------------------------------------------------------


class S3Store(ObjectStore):
    """Objects in an S3 bucket (see the module notes); one aiobotocore client, made on
    first use and closed by :meth:`close`."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        url: str = "",
        field: str = "blob_store",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.region = region
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self.field = field
        self._client: Any = None
        self._context: Any = None
        self._lock = asyncio.Lock()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def _s3(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                # Imported by name: aiobotocore ships no type information.
                aioconfig = importlib.import_module("aiobotocore.config")
                session = importlib.import_module("aiobotocore.session")
                config = aioconfig.AioConfig(
                    s3={"addressing_style": "path"} if self.endpoint else {},
                    retries={"max_attempts": 4, "mode": "standard"},
                )
                context = session.get_session().create_client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region, config=config
                )
                self._client = await context.__aenter__()
                self._context = context
        return self._client

    async def put(self, name: str, data: bytes) -> None:
        s3 = await self._s3()
        try:
            await s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except Exception as exc:
            raise _unavailable(self, f"writing {name}", exc) from None

    async def get(self, name: str) -> bytes | None:
        return await self._read(name, None)

    async def head(self, name: str, length: int) -> bytes | None:
        return await self._read(name, f"bytes=0-{max(0, length - 1)}")

    async def _read(self, name: str, byte_range: str | None) -> bytes | None:
        s3 = await self._s3()
        args = {"Bucket": self.bucket, "Key": self._key(name)}
        if byte_range is not None:
            args["Range"] = byte_range
        try:
            response = await s3.get_object(**args)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except Exception as exc:
            if _missing(exc):
                return None
            raise _unavailable(self, f"reading {name}", exc) from None
        return data

    async def delete(self, names: Sequence[str]) -> None:
        s3 = await self._s3()
        for start in range(0, len(names), _S3_PAGE):
            chunk = names[start : start + _S3_PAGE]
            try:
                reply = await s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(n)} for n in chunk], "Quiet": True},
                )
            except Exception as exc:
                raise _unavailable(self, f"deleting {len(chunk)} objects", exc) from None
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise Unavailable(
                    f"{self.field} {self.url}: deleting {first.get('Key')} failed: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    field=self.field,
                )

    async def scan(self, after: str, limit: int) -> list[ObjectInfo]:
        s3 = await self._s3()
        base = f"{self.prefix}/" if self.prefix else ""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
        if after:
            args["StartAfter"] = base + after
        out: list[ObjectInfo] = []
        while len(out) < limit:
            args["MaxKeys"] = min(_S3_PAGE, limit - len(out))
            try:
                reply = await s3.list_objects_v2(**args)
            except Exception as exc:
                raise _unavailable(self, "listing objects", exc) from None
            for entry in reply.get("Contents") or []:
                out.append(
                    ObjectInfo(
                        entry["Key"][len(base) :],
                        entry["LastModified"].timestamp(),
                        int(entry.get("Size", 0)),
                    )
                )
            token = reply.get("NextContinuationToken")
            if not reply.get("IsTruncated") or not token:
                break
            args.pop("StartAfter", None)
            args["ContinuationToken"] = token
        return out[:limit]

    async def close(self) -> None:
        async with self._lock:
            context, self._context, self._client = self._context, None, None
            if context is not None:
                with contextlib.suppress(Exception):
                    await context.__aexit__(None, None, None)


def _missing(exc: BaseException) -> bool:
    """Whether a botocore error says the object does not exist."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


# A local directory -----------------------------------------------------------------------


class DirectoryStore(ObjectStore):
    """Objects as files under a directory (see the module notes); blocking file work
    runs in worker threads."""

    def __init__(self, root: Path, *, url: str = "", field: str = "blob_store") -> None:
        self.root = root
        self.url = url or str(root)
        self.field = field

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"bad object name {name!r}", field=self.field)
        return self.root.joinpath(*parts)

    async def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise _unavailable(self, f"writing {name}", exc) from None

    async def get(self, name: str) -> bytes | None:
        return await self._read(name, None)

    async def head(self, name: str, length: int) -> bytes | None:
        return await self._read(name, length)

    async def _read(self, name: str, length: int | None) -> bytes | None:
        path = self._path(name)

        def read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read() if length is None else f.read(length)
            except FileNotFoundError:
                return None

        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            raise _unavailable(self, f"reading {name}", exc) from None

    async def delete(self, names: Sequence[str]) -> None:
        paths = [self._path(n) for n in names]

        def remove() -> None:
            parents = set()
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                parents.add(path.parent)
            for parent in parents:  # an item's directory goes with its last object
                if parent != self.root:
                    with contextlib.suppress(OSError):
                        parent.rmdir()

        try:
            await asyncio.to_thread(remove)
        except OSError as exc:
            raise _unavailable(self, f"deleting {len(names)} objects", exc) from None

    async def scan(self, after: str, limit: int) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            for path, stat in _files(self.root, self.root):
                name = path.relative_to(self.root).as_posix()
                if name.encode() <= after.encode():
                    continue
                out.append(ObjectInfo(name, stat.st_mtime, stat.st_size))
            out.sort(key=lambda o: o.name.encode())
            return out[:limit]

        try:
            return await asyncio.to_thread(walk)
        except OSError as exc:
            raise _unavailable(self, "listing objects", exc) from None

    async def close(self) -> None:
        return None


def _files(root: Path, top: Path) -> list[tuple[Path, os.stat_result]]:
    """Every regular file under ``root`` with its stat (none when ``root`` is absent)."""
    found: list[tuple[Path, os.stat_result]] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                found.extend(_files(Path(entry.path), top))
            elif entry.is_file(follow_symlinks=False):
                found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
    return found


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a temporary file in the same directory, fsynced, renamed
    over ``path``; then the directory (and a directory made for it) is fsynced."""
    made = not path.parent.exists()
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                f = open(temp, "wb")
            except FileNotFoundError:  # a delete removed the emptied directory meanwhile
                if attempt == 2:
                    raise
                continue
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            break
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)
    if made:
        _fsync_directory(path.parent.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
