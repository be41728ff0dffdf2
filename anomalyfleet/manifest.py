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


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST_NAME} (incomplete or not an anomalyfleet artefact)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest ({exc.msg})") from exc


def verify_manifest(root: str | Path) -> dict:
    """Check every listed file's size and checksum; raise naming the first bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel, entry in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestError(f"{path}: size {size} bytes, manifest says {entry['size']} (truncated?)")
        if file_sha256(path) != entry["sha256"]:
            raise ManifestError(f"{path}: checksum mismatch (corrupted)")
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
            raise ManifestError(f"{root}: no {MANIFEST_NAME} (incomplete or not an anomalyfleet artefact)") from None
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: corrupt manifest ({exc.msg})") from exc
        files, problem = {}, None
        for rel, entry in manifest.get("files", {}).items():
            try:
                data = (root / rel).read_bytes()
            except FileNotFoundError:
                problem = f"{root / rel}: listed in the manifest but missing"
                break
            if len(data) != entry["size"]:
                problem = f"{root / rel}: size {len(data)} bytes, manifest says {entry['size']} (truncated?)"
                break
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problem = f"{root / rel}: checksum mismatch (corrupted)"
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

