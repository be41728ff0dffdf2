"""Small value types shared by the storage backends."""

from __future__ import annotations

from dataclasses import dataclass

from anomalyfleet.errors import StorageError


class ObjectNotFound(StorageError):
    """The object (or file) a URI names does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    # Changes whenever the content may have changed: the S3 ETag, or mtime+size locally.
    etag: str
    # Last modification, seconds since the epoch, where the listing gives it.
    modified: float | None = None
