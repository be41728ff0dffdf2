"""One set of operations over local paths, file:// and s3:// URIs."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

from anomalyfleet.storage.local import LocalBackend
from anomalyfleet.storage.options import S3Options
from anomalyfleet.storage.s3 import S3Backend
from anomalyfleet.storage.types import ObjectInfo
from anomalyfleet.storage.uri import Location, parse

_LOCAL = LocalBackend()


def backend_for(loc: Location, options: S3Options | None = None):
    if not loc.is_remote:
        return _LOCAL
    return S3Backend(options or S3Options.from_env())


def read_bytes(uri: str | Path, options: S3Options | None = None) -> bytes:
    loc = parse(uri)
    return backend_for(loc, options).read_bytes(loc)


def read_text(uri: str | Path, options: S3Options | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def open_read(uri: str | Path, options: S3Options | None = None) -> BinaryIO:
    """A binary stream; large objects are not held in memory at once. Close it after use."""
    loc = parse(uri)
    return backend_for(loc, options).open_read(loc)


def write_bytes(uri: str | Path, data: bytes, options: S3Options | None = None, progress=None) -> None:
    """All or nothing: a reader sees the old object, no object, or the complete new one.

    `progress(n)` is called with each number of bytes sent (from transfer threads on S3).
    """
    loc = parse(uri)
    backend_for(loc, options).write_bytes(loc, data, progress)


def create_new(uri: str | Path, data: bytes, options: S3Options | None = None) -> bool:
    """Write the object whole only if there is none yet; False (and nothing written) when there is.
    One of several writers racing for the same name wins: a claim (S3 conditional put, If-None-Match;
    locally a hard link of a complete temporary file)."""
    loc = parse(uri)
    return backend_for(loc, options).create_new(loc, data)


def replace_if(uri: str | Path, data: bytes, etag: str | None, options: S3Options | None = None) -> bool:
    """Compare and swap: write the object whole only if it is still the one `stat` gave this `etag`
    (None: only if there is none). False, and nothing written, when another writer came first."""
    if etag is None:
        return create_new(uri, data, options)
    loc = parse(uri)
    return backend_for(loc, options).replace_if(loc, data, etag)


def write_text(uri: str | Path, text: str, options: S3Options | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def upload_file(source: str | Path, uri: str | Path, options: S3Options | None = None, progress=None) -> None:
    """Copy a local file to `uri` (multipart for large files on S3), atomically."""
    loc = parse(uri)
    backend_for(loc, options).upload_file(Path(source), loc, progress)


def download_file(uri: str | Path, target: str | Path, options: S3Options | None = None, progress=None) -> Path:
    """Copy `uri` to a local file, through a temporary name."""
    loc = parse(uri)
    backend_for(loc, options).download_file(loc, Path(target), progress)
    return Path(target)


def exists(uri: str | Path, options: S3Options | None = None) -> bool:
    loc = parse(uri)
    return backend_for(loc, options).exists(loc)


def stat(uri: str | Path, options: S3Options | None = None) -> ObjectInfo:
    loc = parse(uri)
    return backend_for(loc, options).stat(loc)


def list_objects(prefix: str | Path, options: S3Options | None = None) -> Iterator[ObjectInfo]:
    """Every object under `prefix` taken as a directory, recursively, in key order."""
    loc = parse(prefix)
    return backend_for(loc, options).list(loc)


def delete(uri: str | Path, options: S3Options | None = None) -> None:
    loc = parse(uri)
    backend_for(loc, options).delete(loc)


def copy(source: str | Path, target: str | Path, options: S3Options | None = None) -> None:
    """Copy one object; across backends it goes through a local temporary file."""
    src, dst = parse(source), parse(target)
    if not src.is_remote and not dst.is_remote:
        _LOCAL.copy(src, dst)
    elif src.is_remote and dst.is_remote:
        backend_for(src, options).copy(src, dst)
    elif not src.is_remote:
        backend_for(dst, options).upload_file(src.path, dst)
    else:
        backend_for(src, options).download_file(src, dst.path)
