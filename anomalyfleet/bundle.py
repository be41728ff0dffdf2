"""Detector bundles (our format) and AnomalyCLIP reference checkpoints (theirs).

A bundle is a directory: `detector.json` (backbone spec and fingerprint, preprocessing, layers,
DPAM depth, thresholds, training metadata, format version), `prompts.pt` (the prompt weights),
optionally `memory.pt` (a line's normal patch memory; its layers, size, calibrations and fusion
settings are under "memory" in detector.json) and `manifest.json` (sizes and SHA-256, written
last and checked on load). A bundle without a memory is written as format 1, exactly as before;
one with a memory as format 2, so an older anomalyfleet refuses it instead of silently scoring
with the prompts alone against thresholds set for fused scores. Likewise format 3 for a fused score
with the prompts' position term, 4 where the memory's image score has its position share, and 5
where the fused map takes the memory's image score: each is refused by code that would score it
without. It is published by writing a temporary
directory and renaming it, so a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from anomalyfleet import __version__, storage
from anomalyfleet.backbones import BackboneSpec, VisionBackbone, create_backbone
from anomalyfleet.detector import Detector, DetectorSettings, make_prompts, prompt_kind
from anomalyfleet.errors import BundleError, StorageError
from anomalyfleet.manifest import ManifestError, atomic_write_bytes, default_mode, read_verified, write_manifest
from anomalyfleet.memory import LineMemory
from anomalyfleet.prompts import AnomalyCLIPPromptLearner, PromptConfig
from anomalyfleet.storage.local import replace_directory

FORMAT = "anomalyfleet-detector"
FORMAT_VERSION = 5  # the newest this code reads and writes
REQUIRED_KEYS = ("backbone", "backbone_fingerprint", "settings", "prompt_kind")
MEMORY_FORMAT_VERSION = 2  # bundles with a line memory; those without stay at 1
# A fused score with the position term: older code would read the bundle and score without the term,
# against thresholds set with it; a newer format makes it refuse the bundle instead.
POSITION_FORMAT_VERSION = 3
MEMORY_POSITION_FORMAT_VERSION = 4  # likewise for the memory's position share
MAP_SCORE_FORMAT_VERSION = 5  # and for a fused map that takes the memory's image score
DETECTOR_JSON = "detector.json"
PROMPTS_FILE = "prompts.pt"
MEMORY_FILE = "memory.pt"


def _prompt_config_dict(prompts) -> dict | None:
    if isinstance(prompts, AnomalyCLIPPromptLearner):
        c = prompts.config
        return {"n_ctx": c.n_ctx, "depth": c.depth, "deep_length": c.deep_length, "fp16_deep_prompts": c.fp16_deep_prompts}
    return None


def _format_version(memory: LineMemory | None) -> int:
    if memory is None:
        return 1
    if memory.fusion.uses_memory_map_score:
        return MAP_SCORE_FORMAT_VERSION
    if memory.fusion.uses_memory_position:
        return MEMORY_POSITION_FORMAT_VERSION
    return POSITION_FORMAT_VERSION if memory.fusion.position_weight > 0 else MEMORY_FORMAT_VERSION


def bundle_metadata(detector: Detector, training: dict | None = None) -> dict:
    meta = {
        "format": FORMAT,
        "format_version": _format_version(detector.memory),
        "anomalyfleet_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone": detector.backbone.spec(),
        "backbone_fingerprint": detector.backbone.fingerprint(),
        "prompt_kind": prompt_kind(detector.prompts),
        "prompt_config": _prompt_config_dict(detector.prompts),
        "preprocess": {
            "image_size": detector.settings.image_size,
            "resize": "bicubic, both sides (aspect not kept), centre crop",
            "mean": list(detector.mean),
            "std": list(detector.std),
            "mask_threshold": 0.5,
        },
        "settings": detector.settings.to_dict(),
        "thresholds": dict(detector.thresholds),
        "training": dict(training if training is not None else detector.metadata.get("training", {})),
        "extras": dict(detector.metadata.get("extras", {})),
    }
    if detector.memory is not None:
        meta["memory"] = dict(detector.memory.metadata(), file=MEMORY_FILE)
    return meta


def save_bundle(detector: Detector, path: str | Path, training: dict | None = None) -> Path | str:
    """Write the bundle directory atomically (replacing an existing bundle at `path`).

    An s3:// target is written locally first and uploaded with its manifest last; for versioned,
    immutable publication use `anomalyfleet.storage.BundleRegistry`.
    """
    check_bundle_target(path)
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="anomalyfleet-bundle-") as tmp:
            local = save_bundle(detector, Path(tmp) / "bundle", training)
            storage.put_tree(local, str(path))
        return str(path)
    path = storage.parse(path).path
    if path.is_symlink():
        path = path.resolve()  # a link to a bundle (e.g. "current"): replace the bundle, keep the link
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, default_mode(directory=True))
    try:
        state = {k: v.detach().cpu().clone() for k, v in detector.prompts.state_dict().items()}
        torch.save(state, staging / PROMPTS_FILE)
        if detector.memory is not None:
            torch.save(detector.memory.tensors(), staging / MEMORY_FILE)
        meta = bundle_metadata(detector, training)
        atomic_write_bytes(staging / DETECTOR_JSON, json.dumps(meta, indent=2, sort_keys=True).encode())
        write_manifest(staging)
        replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def check_bundle_target(target: str | Path) -> None:
    """Raise BundleError unless a bundle may be written at `target`: nothing there yet, an empty
    directory, or a bundle (which is replaced). A mistyped --out must never delete someone's files;
    commands call this before their work, so they fail before hours of training, not after."""
    if storage.is_remote(target):
        _check_replaceable_prefix(str(target))
        return
    path = storage.parse(target).path
    if path.is_symlink():
        path = path.resolve()
    if not path.exists():
        return
    if path.is_dir() and ((path / DETECTOR_JSON).is_file() or not any(path.iterdir())):
        return
    kind = "directory" if path.is_dir() else "file"
    raise BundleError(f"{path} exists and is not a detector bundle (a {kind}); refusing to replace it: "
                      "choose another output path")


def _check_replaceable_prefix(uri: str) -> None:
    prefix = uri.rstrip("/") + "/"
    names = []
    try:
        for info in storage.list_objects(uri.rstrip("/")):
            names.append(info.uri.removeprefix(prefix))
            if len(names) > 1000:
                break
    except StorageError as exc:
        raise BundleError(f"cannot check what is at {uri} before writing a bundle there (this needs permission to "
                          f"list the prefix): {exc}") from None
    if names and DETECTOR_JSON not in names:
        raise BundleError(f"{uri} holds {len(names)}{'+' if len(names) > 1000 else ''} objects and no detector bundle; "
                          "refusing to write over them: choose another output prefix")


def _local_bundle_dir(path: str) -> Path:
    if storage.is_remote(path):
        return storage.cached_tree(path)
    local = storage.parse(path).path
    if not local.exists():
        raise BundleError(f"detector bundle not found: {path}")
    if not local.is_dir():
        raise BundleError(f"{path} is not a detector bundle directory (a reference checkpoint? use import-checkpoint)")
    return local


class BundleContents(NamedTuple):
    """One verified state of a bundle: its metadata and the bytes of every file its manifest lists."""

    meta: dict
    files: dict[str, bytes]


def read_bundle(path: str | Path) -> BundleContents:
    """One verified state of the bundle: everything a load parses comes from the same save, even
    when the bundle is saved again at the same path meanwhile. The metadata's `_version` is that
    state's manifest digest (`registry.manifest_version`)."""
    local = _local_bundle_dir(str(path))
    try:
        raw, files = read_verified(local)
    except ManifestError as exc:
        raise BundleError(str(exc)) from exc
    if DETECTOR_JSON not in files:
        raise BundleError(f"{path}: not an anomalyfleet detector bundle (no {DETECTOR_JSON} in its manifest)")
    try:
        meta = json.loads(files[DETECTOR_JSON])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: corrupt {DETECTOR_JSON} ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not an anomalyfleet detector bundle")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {meta['format_version']} is newer than this anomalyfleet ({FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise BundleError(f"{path}: {DETECTOR_JSON} lacks {', '.join(missing)} (damaged or hand-edited)")
    meta["_local_dir"] = str(local)
    meta["_version"] = hashlib.sha256(raw).hexdigest()[:12]
    return BundleContents(meta, files)


def backbone_key(meta: dict) -> tuple[str, str]:
    """Bundles with equal keys run on the same backbone weights: one built backbone can serve them all."""
    return json.dumps(meta["backbone"], sort_keys=True), str(meta["backbone_fingerprint"])


def read_bundle_metadata(path: str | Path) -> dict:
    return read_bundle(path).meta


def check_bundle(path: str | Path) -> dict:
    """The bundle's metadata, after checking that its weights files parse (what a load needs short
    of building the backbone): a bundle that fails here would fail every loader."""
    meta, files = read_bundle(path)
    _prompt_tensors(path, files)
    if meta.get("memory"):
        _memory_tensors(path, files, meta)
    return meta


def load_bundle(
    path: str | Path,
    device: torch.device | str = "cpu",
    backbone: VisionBackbone | None = None,
    backbone_spec: BackboneSpec | None = None,
    contents: BundleContents | None = None,
    **overrides,
) -> Detector:
    """Load a bundle; refuse it if the backbone's weights are not the ones it was trained on.

    `backbone` reuses an already built backbone (shared between lines); `backbone_spec` points to
    where the same weights live on this machine. `contents`: what `read_bundle(path)` returned, for
    a caller that looked at the metadata first (to pick a shared backbone) and must load exactly the
    state it looked at. `overrides`: image_size, layers, dpam_layers, sigma (a line memory refuses
    image size, DPAM depth or map layers other than those it was built at).
    """
    meta, files = contents if contents is not None else read_bundle(path)
    spec = backbone_spec or BackboneSpec.from_dict(meta["backbone"])
    settings = DetectorSettings.from_dict(meta["settings"])
    if backbone is None:
        backbone = create_backbone(spec, settings.image_size)
    found = backbone.fingerprint()
    if found != meta["backbone_fingerprint"]:
        raise BundleError(
            f"{path} was trained on backbone {BackboneSpec.from_dict(meta['backbone']).label()} "
            f"(fingerprint {meta['backbone_fingerprint']}), but the backbone given has fingerprint {found}"
        )
    config = PromptConfig(**meta["prompt_config"]) if meta.get("prompt_config") else PromptConfig()
    prompts = make_prompts(backbone, config)
    if prompt_kind(prompts) != meta["prompt_kind"]:
        raise BundleError(f"{path} holds {meta['prompt_kind']} prompts; this backbone needs {prompt_kind(prompts)} prompts")
    state = _prompt_tensors(path, files)
    try:
        prompts.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{path}: prompt weights do not fit the backbone ({str(exc).splitlines()[0]})") from exc
    memory = _load_memory(path, files, meta, backbone) if meta.get("memory") else None
    detector = Detector(
        backbone,
        prompts,
        settings,
        thresholds=meta.get("thresholds"),
        metadata={"training": meta.get("training", {}), "extras": meta.get("extras", {}), "bundle": str(path),
                  "bundle_version": meta["_version"]},
        memory=memory,
    )
    detector.with_settings(**overrides)
    return detector.to(device)


def _load_tensors(path, name: str, data: bytes) -> dict:
    """A weights file of the bundle; one that is not a tensor archive is a BundleError (its manifest
    may list it correctly: it was written damaged)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds (pickle, zip, runtime) for a bad archive
        raise BundleError(f"{path}: {name} is not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise BundleError(f"{path}: {name} holds a {type(state).__name__}, not named tensors")
    return state


def _prompt_tensors(path, files: dict[str, bytes]) -> dict:
    if PROMPTS_FILE not in files:
        raise BundleError(f"{path}: {PROMPTS_FILE} is missing from the bundle")
    return _load_tensors(path, PROMPTS_FILE, files[PROMPTS_FILE])


def _memory_tensors(path, files: dict[str, bytes], meta: dict) -> dict:
    name = meta["memory"].get("file", MEMORY_FILE)
    if name not in files:
        raise BundleError(f"{path}: detector.json describes a line memory but {name} is missing")
    return _load_tensors(path, name, files[name])


def _load_memory(path, files: dict[str, bytes], meta: dict, backbone: VisionBackbone) -> LineMemory:
    info = meta["memory"]
    tensors = _memory_tensors(path, files, meta)
    try:
        memory = LineMemory.from_saved(info, tensors)
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: unreadable line memory ({exc})") from exc
    for layer in memory.layers:
        width = memory.bank(layer).features.shape[-1]
        if width != backbone.feature_dim:
            raise BundleError(f"{path}: memory features have width {width}; the backbone's are {backbone.feature_dim}")
    return memory


# --- reference checkpoints ------------------------------------------------------------------------


def _reference_prompt_config(state: dict, fp16_deep_prompts: bool) -> PromptConfig:
    deep = sorted(k for k in state if k.startswith("compound_prompts_text."))
    if "ctx_pos" not in state or "ctx_neg" not in state or not deep:
        raise BundleError("not an AnomalyCLIP prompt checkpoint: ctx_pos, ctx_neg or compound_prompts_text.* missing")
    return PromptConfig(
        n_ctx=int(state["ctx_pos"].shape[-2]),
        depth=len(deep) + 1,
        deep_length=int(state[deep[0]].shape[0]),
        fp16_deep_prompts=fp16_deep_prompts,
    )


def read_reference_checkpoint(checkpoint: str | Path) -> tuple[Path, dict]:
    """(local path, prompt learner state) of a reference checkpoint, checked for what can be checked
    without the backbone, so a wrong file fails at once instead of after loading CLIP weights."""
    checkpoint = storage.local_path_for(str(checkpoint)) if storage.is_remote(checkpoint) else storage.parse(checkpoint).path
    if checkpoint.is_dir():
        raise BundleError(f"{checkpoint} is a directory; a reference checkpoint is one .pth file "
                          "(a detector bundle is used as --detector directly)")
    if not checkpoint.is_file():
        raise BundleError(f"checkpoint not found: {checkpoint}")
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for non-checkpoint files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"cannot read checkpoint {checkpoint}: not a PyTorch checkpoint file ({detail})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt_learner"), dict):
        raise BundleError(f"{checkpoint}: expected a dict with a 'prompt_learner' state dict")
    state = raw["prompt_learner"]
    try:
        _reference_prompt_config(state, fp16_deep_prompts=True)
    except BundleError as exc:
        raise BundleError(f"{checkpoint}: {exc}") from None
    return checkpoint, state


def import_reference_checkpoint(
    checkpoint: str | Path | tuple[Path, dict],
    backbone: VisionBackbone,
    settings: DetectorSettings,
    fp16_deep_prompts: bool = True,
) -> Detector:
    """Build a detector from a reference `{"prompt_learner": state_dict}` file, or from what
    `read_reference_checkpoint` returned for it (so a caller that checked it first reads it once).

    The checkpoint's token buffers are used as they are, exactly as the reference's test script
    loads them, so scores match the reference even if they were made with another tokenizer build.
    """
    checkpoint, state = checkpoint if isinstance(checkpoint, tuple) else read_reference_checkpoint(checkpoint)
    if backbone.text_tower is None:
        raise BundleError("reference checkpoints hold text prompts; the backbone has no text tower (use a CLIP backbone)")
    config = _reference_prompt_config(state, fp16_deep_prompts)
    width = backbone.text_tower.width
    if state["ctx_pos"].shape[-1] != width:
        raise BundleError(f"{checkpoint}: prompt width {state['ctx_pos'].shape[-1]} does not match the text width {width}")
    prompts = AnomalyCLIPPromptLearner(backbone.text_tower, config)
    own = prompts.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(("compound_prompt_projections", "token_", "tokenized_"))]
    if missing:
        raise BundleError(f"{checkpoint}: missing {', '.join(missing)}")
    for key, value in state.items():
        if key in own:
            if own[key].shape != value.shape:
                raise BundleError(f"{checkpoint}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
            own[key] = value.to(own[key].dtype)
    prompts.load_state_dict(own)
    return Detector(backbone, prompts, settings, metadata={"training": {"imported_from": str(checkpoint)}})


def export_reference_checkpoint(detector: Detector, path: str | Path) -> Path:
    if not isinstance(detector.prompts, AnomalyCLIPPromptLearner):
        raise BundleError("only text prompts (CLIP backbones) can be exported to the reference format")
    state = {k: v.detach().cpu().clone() for k, v in detector.prompts.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"prompt_learner": state}, buffer)
    storage.write_bytes(str(path), buffer.getvalue())
    return path
