"""Manifests: sizes and SHA-256 of every file in a directory artefact, written last, checked on read."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from anomalyfleet.errors import AnomalyFleetError

MANIFEST_NAME = "manifest.json"


class ManifestError(AnomalyFleetError):
    """An artefact is incomplete or corrupted: a file is missing, truncated or altered."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give; mkstemp/mkdtemp are owner-only."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a temporary file beside `path`, then rename: readers see all or nothing.

    Streaming writers (torch.save, np.save) go straight to disk without an in-memory copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_mode())
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def build_manifest(root: str | Path) -> dict:
    root = Path(root)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or path.name.startswith("."):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"files": files}


def write_manifest(root: str | Path) -> dict:
    manifest = build_manifest(root)
    atomic_write_bytes(Path(root) / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _no_manifest(root: str | Path) -> ManifestError:
    return ManifestError(f"{root}: no {MANIFEST_NAME} (incomplete or not an anomalyfleet artefact)")


def _parse(raw: bytes | str, path: Path) -> dict:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest ({exc.msg})") from exc


def _mismatch(path: Path, entry: dict, size: int | None, sha256: Callable[[], str]) -> str | None:
    """Why the file at `path` (of `size` bytes, None if missing) is not the one listed, or None.
    The checksum is computed only for a file of the right size."""
    if size is None:
        return f"{path}: listed in the manifest but missing"
    if size != entry["size"]:
        return f"{path}: size {size} bytes, manifest says {entry['size']} (truncated?)"
    if sha256() != entry["sha256"]:
        return f"{path}: checksum mismatch (corrupted)"
    return None


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise _no_manifest(root)
    return _parse(path.read_text(), path)


def verify_manifest(root: str | Path) -> dict:
    """Check every listed file's size and checksum (streamed from disk); raise naming the first bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel, entry in manifest.get("files", {}).items():
        path = root / rel
        size = path.stat().st_size if path.is_file() else None
        problem = _mismatch(path, entry, size, lambda: file_sha256(path))
        if problem:
            raise ManifestError(problem)
    return manifest


def read_verified(root: str | Path, attempts: int = 3) -> tuple[bytes, dict[str, bytes]]:
    """(manifest bytes, {listed file: bytes}) of one consistent state of `root`.

    Each file is read once and checked against the manifest read with it, so the caller parses
    exactly what was verified. A directory replaced while it is read (a bundle saved again at the
    same path) shows as a mismatch and is read again, up to `attempts` times.
    """
    root = Path(root)
    for attempt in range(attempts):
        path = root / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if attempt + 1 < attempts:
                time.sleep(0.05)  # between the two renames of a save without an atomic exchange
                continue
            raise _no_manifest(root) from None
        manifest = _parse(raw, path)
        files, problem = {}, None
        for rel, entry in manifest.get("files", {}).items():
            try:
                data = (root / rel).read_bytes()
            except FileNotFoundError:
                data = None
            problem = _mismatch(root / rel, entry, None if data is None else len(data),
                                lambda: hashlib.sha256(data).hexdigest())
            if problem:
                break
            files[rel] = data
        if problem is None:
            return raw, files
        try:
            changed = (root / MANIFEST_NAME).read_bytes() != raw
        except FileNotFoundError:  # caught between the two renames of a save without an atomic exchange
            changed = True
        if attempt + 1 < attempts and changed:
            continue  # replaced while we read: read the new state
        raise ManifestError(problem)
    raise ManifestError(f"{root}: changed on every read (saved again {attempts} times while loading?)")

