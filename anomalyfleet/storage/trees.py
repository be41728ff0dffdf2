"""Directory artefacts (bundles, libraries) in storage: the manifest is uploaded last, checked on read.

A tree counts as published only once its manifest.json exists, and the manifest names every file
with its size and SHA-256, so a reader never takes a half-uploaded tree for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from anomalyfleet.errors import StorageError
from anomalyfleet.manifest import MANIFEST_NAME, ManifestError, default_mode, file_sha256, verify_manifest
from anomalyfleet.storage import core
from anomalyfleet.storage.cache import cache_dir, locked
from anomalyfleet.storage.options import S3Options
from anomalyfleet.storage.types import ObjectNotFound
from anomalyfleet.storage.uri import is_remote, join, parse

TRANSFER_THREADS = 8


def _manifest_files(local: Path) -> dict:
    try:
        manifest = verify_manifest(local)
    except ManifestError as exc:
        raise StorageError(f"refusing to upload a damaged tree: {exc}") from exc
    return manifest.get("files", {})


def put_tree(local_dir: str | Path, uri: str, options: S3Options | None = None,
             verified_manifest: dict | None = None) -> None:
    """Upload a directory that carries a manifest; its files first, the manifest last.
    `verified_manifest`: its manifest, when the caller has just verified the files against it."""
    local = Path(local_dir)
    files = verified_manifest.get("files", {}) if verified_manifest is not None else _manifest_files(local)
    if not is_remote(uri):
        target = parse(uri).path
        if target.exists():
            raise StorageError(f"{uri} already exists")

        def copy_all(staging: Path) -> None:
            for rel in [*files, MANIFEST_NAME]:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local / rel, staging / rel)

        _build_then_rename(target, copy_all)
        return
    with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
        list(pool.map(lambda rel: core.upload_file(local / rel, join(uri, rel), options), files))
    core.upload_file(local / MANIFEST_NAME, join(uri, MANIFEST_NAME), options)


def _build_then_rename(target: Path, fill: Callable[[Path], None]) -> Path:
    """`fill` a temporary directory beside `target`, then rename it there: all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(staging, default_mode(directory=True))
        fill(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _cached_directory(kind: str, key: str, marker: str, fill: Callable[[Path], None]) -> Path:
    """`cache/<kind>/<key>`, filled once per node; an entry is complete when it holds `marker`.

    Processes asking at once take the lock in turn, and the later ones find the entry complete.
    """
    root = cache_dir(kind)
    final = root / key
    if (final / marker).is_file():
        return final
    with locked(root / f"{key}.lock"):
        if (final / marker).is_file():
            return final
        if final.exists():  # left by a crash before the entry was complete
            shutil.rmtree(final)
        return _build_then_rename(final, fill)


def prefix_mirrors_of(paths: Iterable[str | None]) -> dict[str, str]:
    """{mirror directory: source URI} of the `cached_prefix` mirrors on this node that `paths` lie
    in (a dataset in object storage, read through the cache); other paths are left out."""
    base = cache_dir("prefixes")
    found: dict[str, str] = {}
    for path in paths:
        if path is None:
            continue
        try:
            rel = Path(path).relative_to(base)
        except ValueError:
            continue
        root = base / rel.parts[0]
        if str(root) not in found:
            found[str(root)] = (root / ".complete").read_text()
    return found


def localize_mirrored(mirrors: dict[str, str]) -> Callable[[str | None], str | None]:
    """Where another node's mirror paths are on this node: each mirror is fetched here if it is not
    yet (once per node), and a path is rebased when this node keeps its cache elsewhere. A prefix
    whose listing changed since the other node mirrored it is an error, not silently other data."""
    rebase: dict[str, str] = {}
    for root, uri in mirrors.items():
        marker = Path(root) / ".complete"
        if marker.is_file() and marker.read_text() == uri:
            rebase[root] = root  # the same mirror is here (the driver's node, or a shared cache)
            continue
        local = cached_prefix(uri)
        if local.name != Path(root).name:
            raise StorageError(f"{uri} changed since this job listed it (objects added, removed or rewritten); run it again")
        rebase[root] = str(local)

    def local_path(path: str | None) -> str | None:
        if path is None:
            return None
        for root, local in rebase.items():
            if path == root or path.startswith(root + os.sep):
                return local + path[len(root):]
        return path

    return local_path


def read_remote_manifest(uri: str, options: S3Options | None = None) -> tuple[bytes, dict]:
    manifest_uri = join(uri, MANIFEST_NAME)
    try:
        raw = core.read_bytes(manifest_uri, options)
    except ObjectNotFound:
        raise StorageError(f"{uri}: no {MANIFEST_NAME} (not published, incomplete, or not an anomalyfleet artefact)") from None
    try:
        return raw, json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{manifest_uri}: corrupt manifest ({exc.msg})") from None


def _download_verified(uri: str, files: dict, raw_manifest: bytes, target: Path, options: S3Options | None) -> None:
    def fetch(rel: str) -> None:
        path = target / rel
        core.download_file(join(uri, rel), path, options)
        entry = files[rel]
        if path.stat().st_size != entry["size"]:
            raise StorageError(f"{join(uri, rel)}: {path.stat().st_size} bytes, manifest says {entry['size']} (truncated)")
        if file_sha256(path) != entry["sha256"]:
            raise StorageError(f"{join(uri, rel)}: checksum mismatch with the manifest (corrupted)")

    with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
        list(pool.map(fetch, files))
    (target / MANIFEST_NAME).write_bytes(raw_manifest)


def get_tree(uri: str, local_dir: str | Path, options: S3Options | None = None) -> Path:
    """Download a published tree to `local_dir` (which must not exist), verified, atomically."""
    target = Path(local_dir)
    if target.exists():
        raise StorageError(f"{target} already exists")
    raw, manifest = read_remote_manifest(uri, options)
    return _build_then_rename(target, lambda staging: _download_verified(uri, manifest.get("files", {}), raw, staging, options))


def cached_tree(uri: str, options: S3Options | None = None) -> Path:
    """A local, verified copy of a published tree, shared by every process on this machine.

    Keyed by the manifest's SHA-256: republishing under the same URI gives a new entry, and two
    processes asking at once download it once (the second waits on the lock, then reuses it).
    """
    if not is_remote(uri):
        return parse(uri).path
    raw, manifest = read_remote_manifest(uri, options)
    return _cached_directory("trees", hashlib.sha256(raw).hexdigest(), MANIFEST_NAME,
                             lambda staging: _download_verified(uri, manifest.get("files", {}), raw, staging, options))


def local_path_for(uri: str, options: S3Options | None = None, sha256: str | None = None) -> Path:
    """A local file with the content of `uri` (weights, registries): the path itself when local,
    else a read-through cache entry keyed by the object's ETag and size (or by `sha256` when the
    caller knows the checksum, which is then verified)."""
    if not is_remote(uri):
        path = parse(uri).path
        if not path.exists():
            raise ObjectNotFound(f"not found: {uri}")
        return path
    info = core.stat(uri, options)
    key = sha256 or hashlib.sha256(f"{uri}\0{info.etag}\0{info.size}".encode()).hexdigest()
    root = cache_dir("objects")
    final = root / key / parse(uri).path.name
    if final.is_file():
        return final
    with locked(root / f"{key}.lock"):
        if final.is_file():
            return final
        staging = root / key / f".{final.name}.part"
        core.download_file(uri, staging, options)
        size = staging.stat().st_size
        if size != info.size:
            staging.unlink(missing_ok=True)
            raise StorageError(f"{uri}: downloaded {size} bytes, expected {info.size}")
        if sha256 and file_sha256(staging) != sha256:
            staging.unlink(missing_ok=True)
            raise StorageError(f"{uri}: checksum differs from the expected {sha256[:12]}")
        os.replace(staging, final)
    return final


def cached_prefix(uri: str, options: S3Options | None = None) -> Path:
    """A local mirror of every object under a prefix (a dataset in a bucket), shared on this node.

    Keyed by the listing (keys, sizes, ETags), so adding or changing an object gives a fresh mirror
    while an unchanged prefix is fetched once.
    """
    if not is_remote(uri):
        return parse(uri).path
    base = uri.rstrip("/") + "/"
    objects = list(core.list_objects(uri, options))
    if not objects:
        raise StorageError(f"nothing under {uri} (empty prefix or wrong path)")
    listing = "\n".join(f"{o.uri}\0{o.size}\0{o.etag}" for o in objects)

    def fetch_all(staging: Path) -> None:
        def fetch(info) -> None:
            target = staging / info.uri[len(base):]
            core.download_file(info.uri, target, options)
            if info.modified is not None:
                # The object's time, not the download's: what fingerprints a dataset by its files'
                # times (the feature cache) sees the same files on every node and after a re-fetch.
                os.utime(target, (info.modified, info.modified))

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(fetch, objects))
        (staging / ".complete").write_text(uri)

    return _cached_directory("prefixes", hashlib.sha256(listing.encode()).hexdigest(), ".complete", fetch_all)
