"""Small value types shared by the storage backends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    # Changes whenever the content may have changed: the S3 ETag, or mtime+size locally.
    etag: str
