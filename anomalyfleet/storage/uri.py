"""Storage URIs: local paths, file:// and s3://bucket/key, parsed once."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from anomalyfleet.errors import StorageError

REMOTE_SCHEMES = ("s3",)


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for local
    key: str  # object key (no leading slash) or absolute local path

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def path(self) -> Path:
        return Path(self.key)

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.is_remote else self.key

    def __str__(self) -> str:
        return self.uri()


def parse(uri: str | Path) -> Location:
    text = str(uri)
    if text.startswith("file://"):
        return Location("file", "", str(Path(text[len("file://"):]).expanduser()))
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Location("file", "", str(Path(text).expanduser()))
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{text}: unsupported storage scheme {scheme!r} (use a path, file:// or s3://)")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{text}: no bucket in the URI (s3://bucket/key)")
    return Location(scheme, bucket, key)


def is_remote(uri: str | Path) -> bool:
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *parts: str) -> str:
    """`base` joined with relative parts, keeping the scheme (no normalisation of `..`)."""
    text = str(base)
    if is_remote(text):
        scheme, _, rest = text.partition("://")
        joined = posixpath.join(rest.rstrip("/"), *[p.strip("/") for p in parts if p])
        return f"{scheme}://{joined}"
    return str(Path(parse(text).key).joinpath(*parts))


def basename(uri: str | Path) -> str:
    return posixpath.basename(str(uri).rstrip("/"))
