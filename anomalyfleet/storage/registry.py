"""Versioned detector bundles under a registry prefix: `<root>/detectors/<name>/<version>/`.

Versions are immutable. Publishing uploads the bundle's files, then its manifest (from then on the
version exists), then moves the `latest.json` pointer, so a reader following `latest` never sees a
version that is still uploading.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from anomalyfleet.errors import StorageError
from anomalyfleet.manifest import MANIFEST_NAME, ManifestError, verify_manifest
from anomalyfleet.storage import core
from anomalyfleet.storage.options import S3Options
from anomalyfleet.storage.types import ObjectNotFound
from anomalyfleet.storage.trees import cached_tree, get_tree, put_tree, read_remote_manifest
from anomalyfleet.storage.uri import is_remote, join

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LATEST = "latest.json"
CLAIMS = ".claims"  # one object per version being or having been published: who may publish it
MAX_CLAIM_TRIES = 32


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value) or value in (".", "..") or value.endswith(".json"):
        raise StorageError(f"invalid {kind} {value!r}: letters, digits, '.', '_' and '-' only")
    return value


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    uri: str
    files: int
    size: int
    latest: bool = False


class BundleRegistry:
    def __init__(self, root: str, options: S3Options | None = None):
        self.root = root.rstrip("/") if is_remote(root) else str(Path(root).expanduser())
        self.options = options

    def _name_uri(self, name: str) -> str:
        return join(self.root, "detectors", _check_name("detector name", name))

    def version_uri(self, name: str, version: str) -> str:
        return join(self._name_uri(name), _check_name("version", version))

    # --- reading -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        base = join(self.root, "detectors")
        prefix = base.rstrip("/") + "/"
        found = set()
        for info in core.list_objects(base, self.options):
            parts = info.uri[len(prefix):].split("/")
            if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                found.add(parts[0])
        return sorted(found)

    def versions(self, name: str) -> list[VersionInfo]:
        base = self._name_uri(name)
        prefix = base.rstrip("/") + "/"
        sizes: dict[str, list[int]] = {}
        published = set()
        for info in core.list_objects(base, self.options):
            parts = info.uri[len(prefix):].split("/", 1)
            if len(parts) != 2:
                continue
            version, rel = parts
            if rel == MANIFEST_NAME:
                published.add(version)
            else:
                sizes.setdefault(version, []).append(info.size)
        latest = self.latest(name)
        return [
            VersionInfo(name, v, join(base, v), len(sizes.get(v, [])), sum(sizes.get(v, [])), v == latest)
            for v in sorted(published, key=_version_key)
        ]

    def latest(self, name: str) -> str | None:
        pointer = join(self._name_uri(name), LATEST)
        try:
            raw = core.read_bytes(pointer, self.options)
        except ObjectNotFound:
            return None
        try:
            return json.loads(raw)["version"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StorageError(f"{pointer}: corrupt latest pointer") from None

    def resolve(self, name: str, version: str = "latest") -> str:
        if version == "latest":
            found = self.latest(name)
            if found is None:
                raise StorageError(f"no published version of detector {name!r} in {self.root}")
            version = found
        uri = self.version_uri(name, version)
        if not core.exists(join(uri, MANIFEST_NAME), self.options):
            raise StorageError(f"detector {name!r} has no version {version!r} in {self.root}")
        return uri

    def pull(self, name: str, version: str, target: str | Path) -> Path:
        return get_tree(self.resolve(name, version), target, self.options)

    def cached(self, name: str, version: str = "latest") -> Path:
        return cached_tree(self.resolve(name, version), self.options)

    # --- writing -----------------------------------------------------------------------------------
    def _next_version(self, name: str, after: int = 0) -> str:
        numbers = [int(v.version[1:]) for v in self.versions(name) if _numbered(v.version)]
        return f"v{max([after, *numbers]) + 1:04d}"

    def _claim(self, name: str, version: str, digest: str) -> bool:
        """Claim `version` for a bundle whose manifest has this digest: True when it is ours (newly,
        or claimed before by a push of the same content that did not finish), False when another
        push holds it. Claims sit beside the versions (`.claims/<version>.json`), so a version's
        own prefix holds only the bundle."""
        claim = join(self._name_uri(name), CLAIMS, f"{version}.json")
        record = {"manifest_sha256": digest, "claimed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if core.create_new(claim, json.dumps(record).encode(), self.options):
            return True
        try:
            return json.loads(core.read_bytes(claim, self.options)).get("manifest_sha256") == digest
        except (ObjectNotFound, json.JSONDecodeError, AttributeError):
            return False

    def push(self, bundle_dir: str | Path, name: str, version: str | None = None, set_latest: bool = True) -> VersionInfo:
        local = Path(bundle_dir)
        if not (local / MANIFEST_NAME).is_file():
            raise StorageError(f"{bundle_dir}: not a bundle directory (no {MANIFEST_NAME})")
        try:
            manifest = verify_manifest(local)  # a damaged bundle is refused before it claims a version
        except ManifestError as exc:
            raise StorageError(f"refusing to publish a damaged bundle: {exc}") from exc
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        numbered = version is None
        if numbered:
            # Two pushes at once both see the same next number: each claims it, and the one that
            # loses takes the number after.
            tried = 0
            for _ in range(MAX_CLAIM_TRIES):
                version = self._next_version(name, after=tried)
                if self._claim(name, version, digest):
                    break
                tried = int(version[1:])
            else:
                raise StorageError(f"could not claim a new version of {name!r} after {MAX_CLAIM_TRIES} tries "
                                   "(many pushes at once?)")
        uri = self.version_uri(name, version)
        if core.exists(join(uri, MANIFEST_NAME), self.options):
            existing, _ = read_remote_manifest(uri, self.options)
            if json.loads(existing) == manifest:
                # Same content: a re-run of an earlier push changes nothing (latest included), and
                # says whether this version is latest as it stands.
                return self._info(name, version, uri, manifest, self.latest(name) == version)
            raise StorageError(f"{uri} is already published with other content (versions are immutable)")
        if not numbered and not self._claim(name, version, digest):
            raise StorageError(f"{uri} is being published with other content by another push (or one that failed: "
                               f"remove {join(self._name_uri(name), CLAIMS, version + '.json')} to publish it anew)")
        if not is_remote(uri) and Path(uri).exists():
            raise StorageError(f"{uri} exists but is not a complete version; remove it by hand")
        put_tree(local, uri, self.options, verified_manifest=manifest)
        moved = self._point_latest(name, version, forward_only=numbered) if set_latest else False
        return self._info(name, version, uri, manifest, moved)

    def _point_latest(self, name: str, version: str, forward_only: bool) -> bool:
        """Move `latest.json` to `version`; True when it now points there. A numbered push never
        moves it back past a newer number: of two pushes that finish out of order, the newer version
        stays latest (an explicit version may roll it back, and a named one, e.g. `prod`, is
        replaced by the next numbered push)."""
        uri = join(self._name_uri(name), LATEST)
        pointer = {"version": version, "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = json.dumps(pointer).encode()
        if not forward_only:
            core.write_bytes(uri, data, self.options)
            return True
        # Compare and swap: read the pointer, decide, write only if it is still what was read.
        for _ in range(MAX_CLAIM_TRIES):
            try:
                etag = core.stat(uri, self.options).etag
            except ObjectNotFound:
                etag = None
            current = self.latest(name) if etag is not None else None
            if current is not None and _numbered(current) and _version_key(current) > _version_key(version):
                return False
            if core.replace_if(uri, data, etag, self.options):
                return True
        raise StorageError(f"{uri}: could not move the latest pointer after {MAX_CLAIM_TRIES} tries (many pushes at once?)")

    def _info(self, name, version, uri, manifest, latest) -> VersionInfo:
        files = manifest.get("files", {})
        return VersionInfo(name, version, uri, len(files), sum(f["size"] for f in files.values()), latest)


def _numbered(version: str) -> bool:
    return re.fullmatch(r"v\d+", version) is not None


def _version_key(version: str):
    match = re.fullmatch(r"v(\d+)", version)
    return (0, int(match.group(1)), "") if match else (1, 0, version)
