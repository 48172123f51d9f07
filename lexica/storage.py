"""One storage helper for every stage: fsspec URLs (local folder, file://, s3://) in, files out.

Writes are all-or-nothing: a local file is written under a temporary name and renamed; an
object store makes an object visible only when its single PUT or multipart upload completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lexica.errors import LexicaError


class StorageError(LexicaError, OSError):
    """A URL cannot be read or written."""


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") if path != "/" else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_parquet(fs: fsspec.AbstractFileSystem, path: str):
    """A ``pyarrow.parquet.ParquetFile``: a local file memory-mapped, a remote one through its fsspec
    handle without read-ahead. Read a remote one with ``use_threads=parquet_threads(fs)`` (False):
    Arrow's readers of a Python file hold Python buffers, and one released on an Arrow thread after
    Python began shutting down aborts the process ("terminate called without an active exception")."""
    import pyarrow.parquet as pq

    if is_local(fs):
        return pq.ParquetFile(path, memory_map=True)
    return pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False)


def parquet_threads(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether reads of an ``open_parquet`` file may use Arrow's threads (see there)."""
    return is_local(fs)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def absolute_url(url: str) -> str:
    """A local path made absolute (workers may run in another directory); other URLs unchanged."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a path on ``fs`` has, so that it can be handed to another process."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A binary file that becomes visible at ``path`` only if the block exits without error."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temp_path = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temp_path, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_path, path)
        finally:
            if os.path.exists(temp_path):
                os.remove(temp_path)
        return
    # Object stores: the object appears when close() completes the upload; if we fail before
    # that, discard() aborts the multipart upload so nothing partial becomes visible.
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(Exception):
            handle.discard() if hasattr(handle, "discard") else None
        raise
    handle.close()


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as handle:
        handle.write(data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, document: Any) -> None:
    write_bytes(fs, path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise StorageError(f"{to_url(fs, path)} is not valid JSON ({error})") from error


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists now. Object stores' filesystems answer from a cached listing of the
    parent when they have one, which misses files other processes (actors) wrote since: drop it."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path.rstrip("/").rsplit("/", 1)[0])
    return bool(fs.exists(path))


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """File names directly inside ``folder`` (empty when it does not exist), fresh from storage."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(entry.rstrip("/")) for entry in entries)


def check_writable(fs: fsspec.AbstractFileSystem, folder: str, url_for_messages: str) -> None:
    """Fail early, with the URL named, when the run folder cannot be written."""
    probe = join(folder, f".lexica-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(folder, exist_ok=True)
        write_bytes(fs, probe, b"ok")
        fs.rm(probe)
    except Exception as error:  # any backend error means the same thing to the user
        raise StorageError(f"cannot write to {url_for_messages}: {type(error).__name__}: {error}") from error
