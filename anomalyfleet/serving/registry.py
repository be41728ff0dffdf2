"""The line registry: which detector bundle and threshold each production line uses.

A YAML or JSON document (local path, file:// or, through `anomalyfleet.storage`, s3://):

    version: 1
    lines:
      press-3:
        bundle: bundles/press-3          # relative paths are relative to the registry file
        threshold: 0.62                  # optional: else the bundle's calibrated thresholds["image"]
        pixel_threshold: 1.4             # optional: map level for defect boxes
        tokens: ["a-secret", {token_sha256: "..."}, {token_env: PRESS3_TOKEN}]
      press-7:
        bundle: bundles/generic
        window: {size: 32, min_images: 8}  # optional: batch zero-shot mode (config.WindowSettings)
    clients:                             # optional: tokens that may use several lines
      - {name: qa-dashboard, token_env: QA_TOKEN, lines: ["*"]}

The document is validated once into typed models; every line is then resolved against its bundle's
metadata into a `LineState`, whose `model_id` (bundle URI + manifest digest) names exactly the
weights that will answer. A line whose bundle cannot be read is reported unavailable and does not
stop the other lines from serving.
"""

from __future__ import annotations

import hashlib
import logging
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from anomalyfleet import storage
from anomalyfleet.errors import AnomalyFleetError, ConfigError, validation_problem, yaml_problem
from anomalyfleet.yaml_unique import load_yaml_unique
from anomalyfleet.serving.auth import TokenGrant
from anomalyfleet.serving.config import WindowSettings

logger = logging.getLogger(__name__)

LINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_LINE = "default"
# Threshold used by the built-in registry, whose bundled detector carries no calibrated threshold.
UNCALIBRATED_THRESHOLD = 0.5


class LineToken(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    token: SecretStr | None = None
    token_sha256: str | None = None
    token_env: str | None = None


_TOKEN_KEYS = tuple(LineToken.model_fields)


class LineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: str
    # Not bounded by 1: a line memory's scores are on a calibrated scale where 1 is the normal
    # images' 99th percentile (a prompt-scored line's bound is checked against its bundle).
    # strict: `threshold: yes` would otherwise read as 1.0.
    threshold: float | None = Field(None, ge=0.0, allow_inf_nan=False, strict=True)
    pixel_threshold: float | None = Field(None, ge=0.0, allow_inf_nan=False, strict=True)
    tokens: list[SecretStr | LineToken] = Field(default_factory=list)
    description: str = ""
    window: WindowSettings | None = None

    @field_validator("threshold", "pixel_threshold", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # (strict floats refuse 1; YAML reads "1" as an int)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot), which json.dumps writes, as a string: a number still.
            try:
                return float(value)
            except ValueError:
                return value  # refused below, naming the field
        return value

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_entries(cls, value: Any) -> Any:
        """Name the bad entry and key: pydantic's own message for a union of a string and a table
        is a long internal path that names neither."""
        if not isinstance(value, list):
            raise ValueError("tokens must be a list of token strings or tables")
        for i, entry in enumerate(value):
            if isinstance(entry, dict):
                unknown = sorted(set(map(str, entry)) - set(_TOKEN_KEYS))
                if unknown:
                    raise ValueError(f"tokens[{i}]: unknown key {', '.join(unknown)} (expected {', '.join(_TOKEN_KEYS)})")
            elif not isinstance(entry, str):
                raise ValueError(f"tokens[{i}]: expected a token string or a table, got {type(entry).__name__}")
        return value

    def grants(self, line: str) -> list[TokenGrant]:
        grants = []
        for i, entry in enumerate(self.tokens):
            if isinstance(entry, LineToken):
                data = entry.model_dump(exclude_none=True)
                if "token" in data:
                    data["token"] = entry.token.get_secret_value()  # type: ignore[union-attr]
                data.setdefault("name", f"line:{line}:{i}")
            else:
                data = {"name": f"line:{line}:{i}", "token": entry.get_secret_value()}
            grants.append(TokenGrant(lines=[line], **data))
        return grants


class RegistryDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    lines: dict[str, LineSpec]
    clients: list[TokenGrant] = Field(default_factory=list)

    @field_validator("lines")
    @classmethod
    def _names(cls, lines: dict[str, LineSpec]) -> dict[str, LineSpec]:
        bad = [name for name in lines if not LINE_NAME.match(name)]
        if bad:
            raise ValueError(f"line names must match {LINE_NAME.pattern}: {', '.join(map(repr, bad))}")
        return lines

    @model_validator(mode="after")
    def _version(self) -> "RegistryDocument":
        if self.version != 1:
            raise ValueError(f"registry version {self.version} is not supported (expected 1)")
        return self

    @model_validator(mode="after")
    def _tokens(self) -> "RegistryDocument":
        """Every line token must make a grant (one secret source, a valid digest) now, not when the
        gateway builds its token table (a reload would fail there with a 500)."""
        for name, spec in self.lines.items():
            try:
                spec.grants(name)
            except ValidationError as exc:
                raise ValueError(f"line {name!r} tokens: {validation_problem(exc)}") from None
        return self

    def grants(self) -> list[TokenGrant]:
        grants = list(self.clients)
        for name, spec in self.lines.items():
            grants += spec.grants(name)
        return grants


@dataclass(frozen=True)
class LineState:
    """A line resolved against its bundle: everything the gateway needs without loading weights."""

    name: str
    bundle: str  # as written in the registry
    bundle_uri: str  # resolved (absolute path or URI)
    version: str  # digest of the bundle manifest
    model_id: str  # multiplexed model id: bundle_uri#version
    threshold: float
    threshold_source: str  # "registry" or "bundle"
    pixel_threshold: float
    map_scale: float  # the map's largest possible value (one per map layer)
    image_size: int
    backbone: str
    backbone_fingerprint: str
    created_at: str
    calibrated: bool
    description: str = ""
    signature: tuple | None = None  # stat of the bundle manifest, for cheap change checks
    spec: LineSpec | None = None  # the registry entry it was resolved from
    window: WindowSettings | None = None  # batch zero-shot mode, when the line has one
    notes: tuple[str, ...] = ()  # what a client should know about the line's scores (e.g. a threshold mismatch)

    def public(self) -> dict[str, Any]:
        return {
            "line": self.name,
            "bundle": self.bundle,
            "version": self.version,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "pixel_threshold": self.pixel_threshold,
            "map_scale": self.map_scale,
            "image_size": self.image_size,
            "backbone": self.backbone,
            "created_at": self.created_at,
            "calibrated": self.calibrated,
            "description": self.description,
            "window": None if self.window is None else self.window.model_dump(),
            "notes": list(self.notes),
        }


@dataclass
class RegistrySnapshot:
    document: RegistryDocument
    lines: dict[str, LineState]
    errors: dict[str, str]  # line -> why it is unavailable
    digest: str  # of the registry's bytes
    signature: tuple | None
    loaded_at: float = field(default_factory=time.time)


# --- storage hooks ------------------------------------------------------------------------------


def local_path(uri: str) -> Path | None:
    """The local path behind a plain path or file:// URI; None for remote schemes."""
    return None if storage.is_remote(uri) else storage.parse(uri).path


def read_uri_bytes(uri: str) -> bytes:
    """A registry's bytes; a missing or unreadable local file is a configuration error."""
    path = local_path(uri)
    if path is None:
        return storage.read_bytes(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"line registry not found: {uri}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read line registry {uri}: {exc.strerror or exc}") from exc


def _stat_signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def source_signature(uri: str | None) -> tuple | None:
    """Cheap change marker for local files; None (read and compare digests) for remote ones."""
    if uri is None:
        return ("builtin",)
    path = local_path(uri)
    return _stat_signature(path) if path is not None else None


def resolve_bundle_uri(bundle: str, registry_uri: str | None) -> str:
    if storage.is_remote(bundle):
        return bundle
    path = local_path(bundle)
    assert path is not None
    if not path.is_absolute() and registry_uri is not None:
        base = local_path(registry_uri)
        if base is None:  # a relative bundle beside a registry in object storage
            return registry_uri.rsplit("/", 1)[0] + "/" + bundle.removeprefix("./")
        path = base.parent / path
    return str(path.resolve()) if not path.is_absolute() else str(path)


def bundle_signature(bundle_uri: str) -> tuple | None:
    path = local_path(bundle_uri)
    return _stat_signature(path / "manifest.json") if path is not None else None


# --- parsing and resolution -----------------------------------------------------------------------


def parse_registry(data: bytes | str | dict, origin: str = "registry") -> RegistryDocument:
    if not isinstance(data, dict):
        try:
            data = load_yaml_unique(data) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML/JSON ({yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with a 'lines' table")
    try:
        return RegistryDocument.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {validation_problem(exc)}") from None


def builtin_registry() -> dict:
    from anomalyfleet.cli import default_detector_path

    return {"version": 1, "lines": {DEFAULT_LINE: {
        "bundle": str(default_detector_path()),
        "threshold": UNCALIBRATED_THRESHOLD,
        "description": "the bundled offline detector, uncalibrated threshold",
    }}}


def manifest_version(local_dir: str | Path) -> str:
    return hashlib.sha256((Path(local_dir) / "manifest.json").read_bytes()).hexdigest()[:12]


def resolve_line(name: str, spec: LineSpec, registry_uri: str | None) -> LineState:
    """Read the bundle's metadata (verifying its manifest) and settle the line's threshold."""
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import read_bundle_metadata

    uri = resolve_bundle_uri(spec.bundle, registry_uri)
    signature = bundle_signature(uri)
    meta = read_bundle_metadata(uri)
    version = meta["_version"]
    bundle_thresholds = meta.get("thresholds") or {}
    if spec.threshold is not None:
        threshold, source = float(spec.threshold), "registry"
    elif bundle_thresholds.get("image") is not None:
        threshold, source = float(bundle_thresholds["image"]), "bundle"
    else:
        raise ConfigError(
            f"line {name!r}: no threshold: calibrate its bundle (anomalyfleet calibrate) or set one in the registry"
        )
    memory = meta.get("memory") or {}
    if threshold > 1.0 and (not memory or (memory.get("fusion") or {}).get("mode", "fused") == "prompts"):
        raise ConfigError(f"line {name!r}: threshold {threshold} is above 1, but its bundle scores with prompts alone "
                          "(probabilities, 0..1): no image would ever be flagged")
    settings = meta["settings"]
    if spec.pixel_threshold is not None:
        pixel = float(spec.pixel_threshold)
    elif bundle_thresholds.get("pixel") is not None:
        pixel = float(bundle_thresholds["pixel"])
    else:
        # Maps are sums over the map layers of the abnormal probability: "more likely abnormal
        # than normal on average over layers" is half the number of layers.
        pixel = 0.5 * len(settings["layers"])
    return LineState(
        notes=_threshold_notes(meta, bundle_thresholds if source == "bundle" else {}, spec.window),
        name=name,
        bundle=spec.bundle,
        bundle_uri=uri,
        version=version,
        model_id=f"{uri}#{version}",
        threshold=threshold,
        threshold_source=source,
        pixel_threshold=pixel,
        map_scale=float(len(settings["layers"])),
        image_size=int(settings["image_size"]),
        backbone=BackboneSpec.from_dict(meta["backbone"]).label(),
        backbone_fingerprint=str(meta["backbone_fingerprint"]),
        created_at=str(meta.get("created_at", "")),
        calibrated=bool((meta.get("extras") or {}).get("calibration")),
        description=spec.description,
        signature=signature,
        spec=spec,
        window=spec.window,
    )


def _threshold_notes(meta: dict, thresholds: dict, window: WindowSettings | None) -> tuple[str, ...]:
    """A bundle threshold set with peers served without them (or the reverse) flags another share of
    normal images than it was set for: said in /v1/lines, not refused. So is the start of a window
    of peers: until it holds `min_images` images, images are scored without peers."""
    from anomalyfleet.calibration import thresholds_mismatch

    if window is not None and not window.peers:  # batch zero-shot: scores on the window's own scale
        return ()
    reason = thresholds_mismatch(meta, thresholds, window.size if window is not None else None, advice=False)
    if reason is not None:
        return (reason,)
    set_with_peers = bool(((meta.get("extras") or {}).get("calibration") or {}).get("peers"))
    if window is not None and thresholds and set_with_peers:
        return (f"until its window holds {window.min_images} images (at start-up, and after a restart that "
                f"finds no snapshot) images are scored without peers, against thresholds set with them: "
                f"more normal images are flagged then",)
    return ()


class LineRegistry:
    """Loads a registry and tells, cheaply, when it or one of its local bundles has changed."""

    def __init__(self, uri: str | None):
        self.uri = uri

    def _read(self) -> tuple[bytes, tuple | None]:
        signature = source_signature(self.uri)
        if self.uri is None:
            return json.dumps(builtin_registry(), sort_keys=True).encode(), signature
        return read_uri_bytes(self.uri), signature

    def load(self, previous: RegistrySnapshot | None = None) -> RegistrySnapshot:
        raw, signature = self._read()
        document = parse_registry(raw, origin=self.uri or "built-in registry")
        lines: dict[str, LineState] = {}
        errors: dict[str, str] = {}
        for name, spec in document.lines.items():
            old = previous.lines.get(name) if previous else None
            if old is not None and _unchanged(old, spec, self.uri):
                lines[name] = old
                continue
            try:
                lines[name] = resolve_line(name, spec, self.uri)
            except AnomalyFleetError as exc:
                errors[name] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one line's bundle must not take the others down
                # (a detector.json whose manifest verifies but whose content has wrong types)
                logger.warning("line %s: cannot read bundle %s", name, spec.bundle, exc_info=True)
                errors[name] = f"cannot read bundle {spec.bundle}: {type(exc).__name__}: {exc}"
        return RegistrySnapshot(document, lines, errors, hashlib.sha256(raw).hexdigest()[:12], signature)

    def changed(self, snapshot: RegistrySnapshot) -> bool:
        """Has the registry, or a local bundle it names, changed since `snapshot`?"""
        signature = source_signature(self.uri)
        if signature is None:
            try:
                raw, _ = self._read()
            except AnomalyFleetError:
                return False
            if hashlib.sha256(raw).hexdigest()[:12] != snapshot.digest:
                return True
        elif signature != snapshot.signature:
            return True
        for state in snapshot.lines.values():
            now = bundle_signature(state.bundle_uri)
            # A missing manifest is a bundle mid-publication (save_bundle renames directories):
            # keep serving the old one and look again next time.
            if now is not None and state.signature is not None and now != state.signature:
                return True
        # Lines that failed to resolve may have been fixed by publishing their bundle.
        return bool(snapshot.errors)


def _unchanged(old: LineState, spec: LineSpec, registry_uri: str | None) -> bool:
    if old.spec != spec or resolve_bundle_uri(spec.bundle, registry_uri) != old.bundle_uri:
        return False
    # Remote bundles (no stat signature) are re-resolved only when the registry itself changes.
    return old.signature is None or bundle_signature(old.bundle_uri) == old.signature


__all__ = [
    "DEFAULT_LINE",
    "LineRegistry",
    "LineSpec",
    "LineState",
    "RegistryDocument",
    "RegistrySnapshot",
    "local_path",
    "parse_registry",
    "read_uri_bytes",
    "resolve_line",
]
