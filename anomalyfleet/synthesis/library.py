"""Synthetic defect libraries: a YAML recipe in, a directory of images, masks and a manifest out.

Layout of a library (every path in a manifest row is relative to the library root, which is what
the `library:` data reader expects):

    recipe.json                the recipe and its fingerprint; a re-run must match it
    shards/<type>-<NNNNN>/     one finished shard
        images/<type>-<NNNNNN>.png, masks/<type>-<NNNNNN>.png
        manifest.jsonl         one row per sample (image, mask, label, defect type, source image,
                               generator and settings, seed, region, sha256 of image and mask)
        shard.json             generator versions, timing, host and pid of the worker
        manifest.json          size and SHA-256 of every file of the shard (storage.put_tree format)
    manifest.jsonl             all shards' rows in plan order, written once every shard is done
    card.json, card.md         recipe, counts per type, generator versions
    contact-sheet.png          a grid of samples with their masks outlined
    embeddings/<type>.pt(.json) AnoGen embeddings learned for the recipe (a re-run reuses them)

The output is a local directory or an s3:// prefix. Locally a shard is built in shards/.tmp-* and
renamed into place in one step, so a shard directory with manifest.jsonl is finished. In object
storage a shard is built in a local temporary directory and uploaded with storage.put_tree, its
manifest.json last, so a shard is finished once shards/<id>/manifest.json exists; objects of a
shard whose upload was cut off are overwritten by the re-run (keys are fixed by the plan).

A shard is planned from the recipe alone (type, indices, normal image, seed per sample), so every
run of one recipe plans the same shards and a re-run only does those not yet finished.

On Ray, AnoGen embeddings a recipe asks to learn are learned first, one Ray task per defect type
(`ray.learn_gpus` each), into embeddings/<type>.pt of the library; then a pool of actors writes the
shards. A shard whose actor died goes to a fresh actor (up to `ray.max_retries` times); the dead
actor's half-built shard was never visible, so every sample ends up in the library exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import anomalyfleet
from anomalyfleet import storage
from anomalyfleet.data.transforms import to_rgb
from anomalyfleet.errors import (DECODE_ERRORS, ConfigError, DataError, unreadable_image, user_error_in, validation_problem,
                                 yaml_problem)
from anomalyfleet.manifest import MANIFEST_NAME, write_manifest
from anomalyfleet.storage import ObjectNotFound
from anomalyfleet.storage.local import sync_directory, sync_tree
from anomalyfleet.synthesis.regions import RegionSpec
from anomalyfleet.yaml_unique import load_yaml_unique

SHARDS = "shards"


# --- recipe --------------------------------------------------------------------------------------


class DefectRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    count: int = Field(ge=0)
    generator: str = "perlin"  # perlin | cutpaste | scar | anogen
    settings: dict[str, Any] = Field(default_factory=dict)
    region: dict[str, Any] | None = None  # RegionSpec fields; None: the generator's default
    # AnoGen: a learned embedding file, or support examples (a data spec with masks) to learn it from,
    # and the diffusers pipeline (hub id, local directory or s3:// URI).
    pipeline: str | None = None
    embedding: str | None = None
    support: str | None = None
    learn: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ \t\n") or value.startswith("."):
            raise ValueError(f"defect name {value!r} must be non-empty, without slashes or spaces")
        return value

    @field_validator("generator")
    @classmethod
    def _known_generator(cls, value: str) -> str:
        from anomalyfleet.synthesis.procedural import PROCEDURAL

        if value != "anogen" and value not in PROCEDURAL:
            raise ValueError(f"unknown generator {value!r} (known: {', '.join([*PROCEDURAL, 'anogen'])})")
        return value

    def region_spec(self) -> RegionSpec | None:
        return RegionSpec.from_dict(self.region) if self.region is not None else None


class FaultInjection(BaseModel):
    """For tests of worker loss only: a shard actor SIGKILLs itself once it has written
    `kill_after_images` images (mid-shard), an embedding-learning task once it has done
    `kill_after_learn_steps` steps, as a node going away would. With `once` (a local file path)
    only the first worker to get there dies: it creates the file, so the retries live."""

    model_config = ConfigDict(extra="forbid")

    kill_after_images: int | None = Field(default=None, ge=1)
    kill_after_learn_steps: int | None = Field(default=None, ge=1)
    once: str | None = None

    @model_validator(mode="after")
    def _something_to_kill(self):
        if self.kill_after_images is None and self.kill_after_learn_steps is None:
            raise ValueError("fault_injection needs kill_after_images or kill_after_learn_steps")
        return self


class RayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actors: int = Field(default=2, ge=0)  # 0: run in this process without Ray
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)  # per actor; None: 1.0 for AnoGen when the cluster has GPUs, else 0
    learn_gpus: float | None = Field(default=None, ge=0)  # per AnoGen embedding-learning task; None: as num_gpus
    max_retries: int = Field(default=3, ge=0)  # per shard and per learning task whose worker was lost
    address: str | None = None  # an existing cluster; None: connect or start a local one
    fault_injection: FaultInjection | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "defect-library"
    # Data specs (KIND:PATH?...) whose label-0 images are used, directories, globs or s3:// prefixes;
    # a spec or prefix in object storage is read by every actor through the storage layer (multi-node).
    normal: list[str]
    output: str
    defects: list[DefectRecipe]
    seed: int = 0
    shard_size: int = Field(default=32, ge=1)
    image_size: int | None = Field(default=None, ge=8)  # square resize of normal images; None keeps them
    foreground: Literal["none", "auto"] = "none"  # "auto": estimate the object mask for inside_foreground
    ray: RayOptions = Field(default_factory=RayOptions)

    @field_validator("normal", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("defects")
    @classmethod
    def _unique(cls, value):
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"defect names must be unique, got {names}")
        if not value:
            raise ValueError("a recipe needs at least one defect type")
        return value

    def content(self) -> dict:
        """What decides the samples: everything but where they go and how the work is spread."""
        return self.model_dump(mode="json", exclude={"output", "ray"})


def load_recipe(path: str | Path, **overrides) -> Recipe:
    path = Path(path)
    try:
        data = load_yaml_unique(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe not found: {path}") from exc
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; a recipe is a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    # Relative paths in a recipe are relative to the recipe file, so a recipe can travel with its data.
    base = path.resolve().parent
    return parse_recipe(data, base)


def parse_recipe(data: dict, base: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid recipe: {validation_problem(exc)}") from None
    for defect in recipe.defects:
        defect.region_spec()  # region typos fail before any work starts
    if base is not None:
        recipe.normal = [_rebase(s, base) for s in recipe.normal]
        recipe.output = _rebase(recipe.output, base)
        for d in recipe.defects:
            d.embedding = _rebase(d.embedding, base) if d.embedding else None
            d.support = _rebase(d.support, base) if d.support else None
            if d.pipeline and (d.pipeline.startswith((".", "/")) or (base / d.pipeline).exists()):
                d.pipeline = _rebase(d.pipeline, base)
    return recipe


def _rebase(spec: str, base: Path) -> str:
    if "://" in spec:
        return spec
    kind, sep, rest = spec.partition(":")
    from anomalyfleet.data.readers import KNOWN_KINDS

    if sep and kind in KNOWN_KINDS:
        path, q, query = rest.partition("?")
        return f"{kind}:{_rebase(path, base)}{q}{query}"
    path = Path(spec).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


# --- planning ------------------------------------------------------------------------------------


def resolve_normals(specs: list[str]) -> list[str]:
    """Normal image paths or URIs, sorted and de-duplicated, from data specs, directories, globs or
    s3:// prefixes.

    Images in object storage stay s3:// URIs: the plan (and the manifest's source_image) names them
    the same way on every node, and each actor reads them through the storage layer."""
    from anomalyfleet.data.readers import KNOWN_KINDS

    found: list[str] = []
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        if sep and kind in KNOWN_KINDS:
            found += _normals_from_data_spec(spec, rest.partition("?")[0])
        elif storage.is_remote(spec):
            found += _normals_under_prefix(spec)
        else:
            found += _normals_on_disk(spec)
    found = sorted(set(found))
    if not found:
        raise DataError(f"no normal images found in {specs}")
    return found


def _normals_from_data_spec(spec: str, path: str) -> list[str]:
    from anomalyfleet.data.readers import parse_data_spec

    images = [s.image for s in parse_data_spec(spec) if s.label == 0]
    if not storage.is_remote(path):
        return images
    # The reader saw this node's mirror of the prefix (its layout decides what is normal); name the
    # chosen images by their URIs, which every node can read.
    mirror = storage.cached_prefix(path)
    try:
        return [storage.join(path, Path(image).relative_to(mirror).as_posix()) for image in images]
    except ValueError as exc:  # the listing changed between the reader's look and this one
        raise DataError(f"{path} changed while its normal images were listed; run again") from exc


def _normals_under_prefix(prefix: str) -> list[str]:
    from anomalyfleet.data.readers import IMAGE_SUFFIXES

    return [o.uri for o in storage.list_objects(prefix) if o.uri.lower().endswith(IMAGE_SUFFIXES)]


def _normals_on_disk(spec: str) -> list[str]:
    import glob

    from anomalyfleet.data.readers import IMAGE_SUFFIXES

    path = Path(spec).expanduser()
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return [p for p in sorted(glob.glob(str(path), recursive=True)) if p.lower().endswith(IMAGE_SUFFIXES)]


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed per sample from the recipe seed, type and index: stable across runs and machines."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _type_key(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class WorkItem:
    name: str
    defect: str
    index: int
    normal: str
    seed: int


@dataclass(frozen=True)
class ShardPlan:
    shard_id: str
    defect: str
    items: tuple[WorkItem, ...]


def plan_shards(recipe: Recipe, normals: list[str]) -> list[ShardPlan]:
    shards = []
    for defect in recipe.defects:
        key = _type_key(defect.name)
        # Each normal image is used once before any is used twice, in a seeded order per type.
        order = np.random.default_rng(np.random.SeedSequence([recipe.seed, key, 1])).permutation(len(normals))
        items = [WorkItem(f"{defect.name}-{i:06d}", defect.name, i, normals[order[i % len(normals)]],
                          _derive_seed(recipe.seed, key, i)) for i in range(defect.count)]
        for s, start in enumerate(range(0, len(items), recipe.shard_size)):
            shards.append(ShardPlan(f"{defect.name}-{s:05d}", defect.name, tuple(items[start:start + recipe.shard_size])))
    return shards


def given_embeddings_digest(recipe: Recipe) -> dict[str, str]:
    """{defect type: sha256} of the embedding files a recipe names (`embedding:`): the recipe holds
    only their paths, and a file replaced there would paint another defect into the rest of a
    resumed library. An embedding is a few kilobytes, so reading it whole costs nothing."""
    digests = {}
    for defect in recipe.defects:
        if defect.generator != "anogen" or not defect.embedding:
            continue
        try:
            digests[defect.name] = hashlib.sha256(storage.read_bytes(defect.embedding)).hexdigest()
        except ObjectNotFound:
            raise DataError(f"defect {defect.name}: embedding {defect.embedding} not found") from None
    return digests


def recipe_fingerprint(recipe: Recipe, normals: list[str], embedding_files: bool = True) -> str:
    """What a library is made from. `embedding_files` False: as written before embedding files were
    counted by content (libraries of that version still resume)."""
    content = {"recipe": recipe.content(), "normals": normals}
    given = given_embeddings_digest(recipe) if embedding_files else {}
    if given:  # only then: libraries without such files keep the fingerprint they were made with
        content["embedding_files"] = given
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# --- generators ----------------------------------------------------------------------------------


def make_generator(defect: DefectRecipe, embedding: str | None = None, device: str = "auto"):
    """The generator for one defect type (loaded once per worker and reused for all its shards)."""
    if defect.generator == "anogen":
        from anomalyfleet.synthesis.anogen import AnoGenGenerator

        path = embedding or defect.embedding
        if not defect.pipeline or not path:
            raise ConfigError(f"defect {defect.name}: anogen needs `pipeline` and `embedding` (or `support` to learn it)")
        return AnoGenGenerator.load(defect.pipeline, path, settings=defect.settings, device=device)
    from anomalyfleet.synthesis.procedural import make_procedural

    return make_procedural(defect.generator, defect.settings)


def check_generators(recipe: Recipe) -> None:
    """Each procedural type builds and makes one sample on a plain grey image, and each AnoGen type's
    settings parse, before the output is touched: a bad setting (a reversed range, a share above 1)
    is a one-line error now, not a worker's traceback after the output was claimed, or hours into
    learning embeddings."""
    from anomalyfleet.synthesis.anogen import GenerateConfig

    size = recipe.image_size or 64
    grey = np.full((size, size, 3), 128, np.uint8)
    for defect in recipe.defects:
        try:
            if defect.generator == "anogen":
                GenerateConfig.from_dict(defect.settings)
                if not defect.pipeline:
                    raise ConfigError("anogen needs `pipeline` (a Stable Diffusion directory or s3:// prefix)")
                continue
            region = defect.region_spec()
            make_generator(defect).generate(grey, recipe.seed, region, None)
        except ConfigError as exc:
            raise ConfigError(f"defect {defect.name}: {exc}") from None
        except (ValueError, TypeError, ZeroDivisionError, IndexError) as exc:
            raise ConfigError(f"defect {defect.name}: its settings cannot make a sample ({type(exc).__name__}: {exc})") from None


def generator_versions(generator) -> dict:
    versions = {"anomalyfleet": anomalyfleet.__version__, "numpy": np.__version__}
    extra = getattr(generator, "versions", None)
    if callable(extra):
        versions.update(extra())
    return versions


def _load_rgb(path: str, size: int | None) -> np.ndarray:
    from anomalyfleet.data.transforms import load_image

    image = _load_remote_rgb(path) if storage.is_remote(path) else load_image(path)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def _load_remote_rgb(uri: str) -> Image.Image:
    """A normal image in object storage, read by whichever node's actor needs it (one GET)."""
    raw = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(raw)) as handle:
            return to_rgb(handle)  # deep (16-bit) normals rescaled as the detector reads them
    except DECODE_ERRORS as exc:
        raise unreadable_image(uri) from exc


def _check_local_normals_open(normals: list[str]) -> None:
    """Every local normal image opens as an image (its header; decoding happens in the workers):
    the usual bad file (empty, not an image) is refused before the output is touched. Images in
    object storage are met by the workers (a GET each up front would cost as much as the run)."""
    for path in normals:
        if storage.is_remote(path):
            continue
        try:
            with Image.open(path):
                pass
        except Image.DecompressionBombError:
            raise DataError(f"cannot read image {path}: too many pixels to decode") from None
        except DECODE_ERRORS as exc:
            raise unreadable_image(path) from exc


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


SHARD_TMP_PREFIX = "anomalyfleet-shard-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# A build directory's name ends with its builder: a tag of the machine and the process id.
_BUILDER = re.compile(r"-h(?P<host>[0-9a-f]{8})-pid(?P<pid>\d+)-[0-9a-f]{8}$")
# A build directory of another machine (a shared file system) or without an owner is left this long.
_FOREIGN_BUILD_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _build_dir_name(prefix: str, shard_id: str) -> str:
    return f"{prefix}{shard_id}-h{_host_tag()}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _builder_gone(path: Path, now: float) -> bool:
    """Whether a shard build directory is a leftover: its builder, a process of this machine, is
    gone; or it is another machine's (or has no owner in its name) and untouched for a day. Another
    run's live build is never a leftover: deleting it would fail its shard."""
    owner = _BUILDER.search(path.name)
    if owner and owner["host"] == _host_tag():
        return not _pid_alive(int(owner["pid"]))
    try:
        return now - path.stat().st_mtime > _FOREIGN_BUILD_S
    except FileNotFoundError:
        return False


def remove_orphaned_shard_dirs(directory: str | Path | None = None) -> list[Path]:
    """Remove local shard build directories of workers that died (a SIGKILLed actor cannot clean up).
    Called when a writer starts, so a node that lost actors does not keep their half-built shards
    forever."""
    removed, now = [], time.time()
    for path in Path(directory or tempfile.gettempdir()).glob(f"{SHARD_TMP_PREFIX}*"):
        if _builder_gone(path, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class ShardWriter:
    """Makes and writes shards. One per worker; it caches each defect type's generator."""

    def __init__(self, recipe: Recipe, root: str | Path, embeddings: dict[str, str] | None = None,
                 device: str = "auto", after_image: Callable[[], None] | None = None):
        self.recipe = recipe
        self.after_image = after_image  # called once per image written (fault injection hooks in here)
        self.root = output_root(str(root))
        self.remote = storage.is_remote(self.root)
        self.embeddings = embeddings or {}
        self.device = device
        self.defects = {d.name: d for d in recipe.defects}
        self._generators: dict[str, Any] = {}
        if self.remote:
            remove_orphaned_shard_dirs()

    def generator(self, defect: str):
        if defect not in self._generators:
            self._generators[defect] = make_generator(self.defects[defect], self.embeddings.get(defect), self.device)
        return self._generators[defect]

    def write(self, shard: ShardPlan) -> dict:
        if shard_finished(self.root, shard.shard_id):
            return {"shard": shard.shard_id, "images": len(shard.items), "skipped": True}
        if self.remote:
            return self._write_remote(shard)
        root = Path(self.root)
        final = root / SHARDS / shard.shard_id
        tmp = root / SHARDS / _build_dir_name(".tmp-", shard.shard_id)
        try:
            info = self._build(shard, tmp)
            # The rename is the finished mark: after a power loss a shard directory there must hold
            # whole files, or a resumed run would skip a shard of empty PNGs.
            sync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another worker finished the same shard first (a retried task); its copy is equal.
                if not (final / "manifest.jsonl").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                sync_directory(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {**info, "skipped": False}

    def _write_remote(self, shard: ShardPlan) -> dict:
        """Build the shard in a local temporary directory, then upload it, its manifest.json last."""
        tmp = Path(tempfile.gettempdir()) / _build_dir_name(SHARD_TMP_PREFIX, shard.shard_id)
        tmp.mkdir(mode=0o700)  # (the name is unique: a random tail after the pid)
        try:
            info = self._build(shard, tmp / "shard")
            storage.put_tree(tmp / "shard", storage.join(self.root, SHARDS, shard.shard_id))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {**info, "skipped": False}

    def _build(self, shard: ShardPlan, tmp: Path) -> dict:
        """Make the shard's files in `tmp` (which must not exist yet); returns shard.json's content."""
        started = time.perf_counter()
        defect = self.defects[shard.defect]
        generator = self.generator(shard.defect)
        region = defect.region_spec()
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        rows = []
        for item in shard.items:
            image = _load_rgb(item.normal, self.recipe.image_size)
            foreground = None
            if self.recipe.foreground == "auto" and region is not None and region.inside_foreground:
                from anomalyfleet.synthesis.regions import estimate_foreground

                foreground = estimate_foreground(image)
            result = generator.generate(image, item.seed, region, foreground)
            image_rel = f"images/{item.name}.png"
            mask_rel = f"masks/{item.name}.png"
            image_bytes = _png_bytes(result.image)
            mask_bytes = _png_bytes(result.mask.astype(np.uint8) * 255)
            (tmp / image_rel).write_bytes(image_bytes)
            (tmp / mask_rel).write_bytes(mask_bytes)
            if self.after_image is not None:
                self.after_image()
            prefix = f"{SHARDS}/{shard.shard_id}/"
            rows.append({
                "image": prefix + image_rel, "mask": prefix + mask_rel, "label": 1,
                "defect_type": shard.defect, "index": item.index, "shard": shard.shard_id,
                "source_image": item.normal, "generator": generator.name, "settings": generator.settings(),
                "seed": item.seed, "region": result.region.to_dict(), "details": result.details,
                "size": [int(result.image.shape[0]), int(result.image.shape[1])],
                "sha256": {"image": hashlib.sha256(image_bytes).hexdigest(),
                           "mask": hashlib.sha256(mask_bytes).hexdigest()},
            })
        info = {"shard": shard.shard_id, "defect_type": shard.defect, "images": len(rows),
                "generator": generator.name, "versions": generator_versions(generator),
                "seconds": round(time.perf_counter() - started, 3), "host": os.uname().nodename,
                "pid": os.getpid()}
        (tmp / "shard.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        (tmp / "manifest.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        # Sizes and checksums of every file: put_tree uploads it last (the finished mark in
        # object storage) and a downloaded shard can be verified against it.
        write_manifest(tmp)
        return info


# --- the job -------------------------------------------------------------------------------------


@dataclass
class LibraryResult:
    root: str
    images: int
    shards: int
    shards_done_now: int
    counts: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def output_root(uri: str) -> str:
    """The library root as storage sees it: an absolute local path, or an s3:// prefix (no trailing /)."""
    if storage.is_remote(uri):
        return uri.rstrip("/")
    return str(storage.parse(uri).path)


def shard_finished(root: str | Path, shard_id: str) -> bool:
    root = str(root)
    if storage.is_remote(root):
        return storage.exists(storage.join(root, SHARDS, shard_id, MANIFEST_NAME))
    return (Path(root) / SHARDS / shard_id / "manifest.jsonl").is_file()


def finished_shards(root: str | Path) -> set[str]:
    root = str(root)
    if storage.is_remote(root):
        # One listing, not a request per shard: a shard is finished once its manifest.json is there.
        base = storage.join(root, SHARDS) + "/"
        done = set()
        for info in storage.list_objects(storage.join(root, SHARDS)):
            shard_id, _, rest = info.uri[len(base):].partition("/")
            if rest == MANIFEST_NAME and not shard_id.startswith("."):
                done.add(shard_id)
        return done
    directory = Path(root) / SHARDS
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir() if not p.name.startswith(".") and (p / "manifest.jsonl").is_file()}


def _check_recipe(root: str, recipe: Recipe, fingerprint: str, before_embedding_files: str | None = None) -> bool:
    """recipe.json goes in before any shard, so a killed run can be resumed and a different recipe
    is refused instead of mixed in. True when this call wrote it (this run starts the library).
    `before_embedding_files`: the fingerprint the version before embedding files were counted
    would have written; a library it started is taken up, its recipe.json rewritten (the files
    cannot be checked against what it was made with, and the run says so)."""
    path = storage.join(root, "recipe.json")
    if not storage.exists(path):
        if finished_shards(root):
            raise ConfigError(f"{root} holds shards but no recipe.json; refusing to mix libraries")
        # Not a library yet: it must be empty, or the library's files (manifest.jsonl, card.*,
        # images) would be written among, or over, someone else's.
        others = []
        for info in storage.list_objects(root):
            if info.uri == str(path):
                continue  # another run's, written since we looked: the read-back below decides
            if info.uri.startswith(storage.join(root, "embeddings") + "/"):
                continue  # learned first by `synth learn --recipe`, for this library
            others.append(info.uri)
            if len(others) > 3:
                break
        if others:
            raise ConfigError(f"{root} is not empty and holds no synthesis library (e.g. {others[0]}); "
                              "refusing to write into it: choose a new or empty output")
        data = json.dumps({"fingerprint": fingerprint, "recipe": recipe.content()}, indent=1, sort_keys=True).encode()
        created = storage.create_new(path, data)  # of two runs racing here, one recipe lands
    else:
        created = False
    # Read back, also after writing: of two runs started on the same output at once, the one whose
    # recipe did not land is refused here rather than mixing its shards in.
    previous = json.loads(storage.read_bytes(path))
    if before_embedding_files is not None and previous.get("fingerprint") == before_embedding_files:
        print(f"note: {root} was started before embedding files counted in a library's recipe; its remaining "
              "shards use the embedding files as they are now", file=sys.stderr)
        previous["fingerprint"] = fingerprint
        storage.write_bytes(path, json.dumps(previous, indent=1, sort_keys=True).encode())
    if previous.get("fingerprint") != fingerprint:
        raise ConfigError(f"{root} holds a library made from a different recipe (or different normal images or "
                          "embedding files); use a new output directory")
    return created


def _withdraw_library(root: str, created_dir: bool) -> None:
    """Remove what a run that started the library wrote before bad input stopped it: its
    recipe.json pins the normal images, so after the user fixes or removes a corrupt one a re-run
    would be refused. Learned embeddings (embeddings/) are kept: they cost most and stay valid."""
    if storage.is_remote(root):
        for info in storage.list_objects(storage.join(root, SHARDS)):
            storage.delete(info.uri)
        storage.delete(storage.join(root, "recipe.json"))
        return
    shutil.rmtree(Path(root) / SHARDS, ignore_errors=True)
    (Path(root) / "recipe.json").unlink(missing_ok=True)
    if created_dir:
        try:
            Path(root).rmdir()
        except OSError:  # embeddings/ (or something written meanwhile) is in it: keep it
            pass


def _clean_partials(root: str) -> None:
    """Left-overs of killed workers in the output's shards/ (never read, safe to delete). In object
    storage there are none: an unfinished shard's objects are overwritten when it is redone."""
    if storage.is_remote(root):
        return
    directory = Path(root) / SHARDS
    if not directory.is_dir():
        return
    now = time.time()
    for p in directory.iterdir():
        if p.name.startswith(".tmp-") and _builder_gone(p, now):
            shutil.rmtree(p, ignore_errors=True)


def support_files_fingerprint(support: str | None) -> str | None:
    """Sizes and times of a support data spec's files, where they are on disk (None elsewhere)."""
    location = (support or "").partition(":")[2].partition("?")[0]
    if not support or storage.is_remote(location):
        return None
    from anomalyfleet.data import parse_data_spec
    from anomalyfleet.data.samples import files_fingerprint
    from anomalyfleet.errors import AnomalyFleetError

    try:
        return files_fingerprint(parse_data_spec(support))
    except AnomalyFleetError:
        return None  # learning reports what is wrong with the support examples


def learning_key(pipeline: str | None, support: str | None, learn: dict, *context) -> str:
    """What an embedding is learned from: the pipeline, the support examples (their files' sizes and
    times too, where they are on disk, so masks corrected in place count) and the learning settings
    a resume must share (more steps, another device or checkpoint interval continue the same
    learning), plus `context` (a seed, a destination)."""
    from anomalyfleet.synthesis.anogen import resume_key

    what = [*context, pipeline, support, resume_key(learn), support_files_fingerprint(support)]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def learned_from_key(recipe: Recipe, defect: DefectRecipe) -> str:
    """A recipe's defect type's `learning_key`, with the recipe's seed. Not the generation settings:
    more samples of a type reuse its embedding."""
    return learning_key(defect.pipeline, defect.support, defect.learn, recipe.seed)


def learn_defect_embedding(recipe: Recipe, defect: DefectRecipe, target: Path, progress: bool,
                           device: str | None = None, on_step: Callable[[int], None] | None = None,
                           key: str | None = None) -> Path:
    """Learn one AnoGen type's embedding into the local file `target`, resuming from the
    checkpoints kept beside it (keyed by what it learns from: other support examples start
    afresh). `device` applies unless the recipe's `learn` settings name one."""
    from anomalyfleet.synthesis.anogen import LearnConfig, learn_embedding

    settings = {"seed": recipe.seed, **({"device": device} if device else {}), **defect.learn}
    config = LearnConfig.from_dict(settings)
    key = key or learned_from_key(recipe, defect)
    return learn_embedding(defect.pipeline, defect.support, target, config=config,
                           checkpoint_dir=target.parent / f".{defect.name}-{key}-checkpoints", progress=progress,
                           defect_name=defect.name, on_step=on_step, metadata={"learned_from": key})


def check_learned_from(recipe: Recipe, root: str, defect: DefectRecipe) -> None:
    """An embedding already in the library must have been learned from what the recipe says now;
    otherwise the library would be made with the old one while its card shows the new support."""
    sidecar = embedding_uri(root, defect.name) + ".json"
    try:
        learned = json.loads(storage.read_bytes(sidecar)).get("learned_from")
    except (ObjectNotFound, ValueError):
        return  # learned before this was recorded (or given as a file): nothing to compare
    if learned is not None and learned != learned_from_key(recipe, defect):
        raise ConfigError(f"{embedding_uri(root, defect.name)} was learned from other support examples, pipeline or "
                          f"learning settings than the recipe's {defect.name!r}; delete it and its .json to learn it again "
                          "(a library already made with it: use a new output)")


def embedding_uri(root: str, defect: str) -> str:
    """Where a library keeps a learned embedding; the .pt existing there means it is done."""
    return storage.join(root, "embeddings", f"{defect}.pt")


def embedding_cache_dir(recipe: Recipe, root: str, defect: DefectRecipe, key: str | None = None) -> Path:
    """Where this node learns an object-storage library's embedding. Keyed by what the embedding is
    learned from as well as the library (the defect's recipe and the seed), so a library deleted and
    run again with other support images or learning settings does not upload the old finished one."""
    learned_from = json.dumps([root, key or learned_from_key(recipe, defect)], sort_keys=True)
    return storage.cache_dir("synthesis") / hashlib.sha256(learned_from.encode()).hexdigest()[:16]


def learn_library_embedding(recipe: Recipe, root: str, defect: DefectRecipe, progress: bool,
                            device: str | None = None, on_step: Callable[[int], None] | None = None,
                            key: str | None = None) -> str:
    """Learn one AnoGen type's embedding into <root>/embeddings/<name>.pt, resumable; returns where it is.

    For an object-storage root it is learned in the node's cache (checkpoints included, so a killed
    run resumes there) and uploaded, the sidecar first and the .pt, which marks it done, last.
    """
    name = f"{defect.name}.pt"
    remote = storage.is_remote(root)
    uri = embedding_uri(root, defect.name)
    if remote and storage.exists(uri):
        return uri
    # The driver's key (a worker on another node would see other file times of the support examples).
    key = key or learned_from_key(recipe, defect)
    directory = embedding_cache_dir(recipe, root, defect, key) if remote else Path(root)
    target = directory / "embeddings" / name
    if not target.is_file():
        learn_defect_embedding(recipe, defect, target, progress, device, on_step, key)
    if not remote:
        return str(target)
    return publish_embedding(target, uri)


def publish_embedding(local: Path, uri: str) -> str:
    """Upload a learned embedding to object storage: its sidecar first, then the .pt, whose
    presence marks it done."""
    sidecar = local.with_name(local.name + ".json")
    if sidecar.is_file():
        storage.upload_file(sidecar, uri + ".json")
    storage.upload_file(local, uri)
    return uri


def _embeddings_to_learn(recipe: Recipe) -> list[DefectRecipe]:
    """AnoGen types given support examples but no embedding file."""
    wanted = []
    for defect in recipe.defects:
        if defect.generator != "anogen" or defect.embedding:
            continue
        if not defect.support:
            raise ConfigError(f"defect {defect.name}: anogen needs `embedding` or `support` examples")
        wanted.append(defect)
    return wanted


def _learn_missing_embeddings(recipe: Recipe, root: str, progress: bool, actors: int) -> dict[str, str]:
    """Learn each missing embedding once, into the library; one already there is skipped (resume).
    With Ray, every type is learned by its own task (GPU work, so not in the driver); without,
    here in this process."""
    wanted = _embeddings_to_learn(recipe)
    todo = [d for d in wanted if not storage.exists(embedding_uri(root, d.name))]
    for defect in wanted:
        if defect not in todo:
            check_learned_from(recipe, root, defect)
    if todo and actors > 0:
        _learn_on_ray(recipe, root, todo, progress)
    else:
        for defect in todo:
            learn_library_embedding(recipe, root, defect, progress)
    return {d.name: embedding_uri(root, d.name) for d in wanted}


def synthesize_library(recipe: Recipe, *, progress: bool = True, actors: int | None = None) -> LibraryResult:
    """Make (or finish) the library a recipe describes. Shards already present are skipped.

    The output is a local directory or an s3:// prefix (through the storage layer)."""
    started = time.perf_counter()
    root = output_root(recipe.output)
    # Everything that can be checked is checked before the output directory exists: a recipe that
    # cannot run leaves nothing behind.
    check_generators(recipe)
    normals = resolve_normals(recipe.normal)
    _check_local_normals_open(normals)
    plan = plan_shards(recipe, normals)
    created_dir = False
    if not storage.is_remote(root):
        Path(root).parent.mkdir(parents=True, exist_ok=True)
        try:
            Path(root).mkdir()
            created_dir = True  # by this run: of two starting at once, only one creates it
        except FileExistsError:
            pass
    try:
        fingerprint = recipe_fingerprint(recipe, normals)
        legacy = recipe_fingerprint(recipe, normals, embedding_files=False)
        started_library = _check_recipe(root, recipe, fingerprint, None if legacy == fingerprint else legacy)
    except BaseException:
        if created_dir:
            # Only if still empty: another run may have put its recipe (and shards) in meanwhile.
            with contextlib.suppress(OSError):
                Path(root).rmdir()
        raise
    _clean_partials(root)
    actors = recipe.ray.actors if actors is None else actors
    try:
        embeddings = _learn_missing_embeddings(recipe, root, progress, actors)
        done = finished_shards(root)
        pending = [s for s in plan if s.shard_id not in done]
        if pending:
            if actors == 0:
                _run_local(recipe, root, pending, embeddings, progress)
            else:
                _run_ray(recipe, root, pending, embeddings, progress, actors)
    except Exception as exc:
        # Bad data (a corrupt normal image) met before any shard was finished by the run that
        # started this library: leave nothing of it, so the fixed input starts afresh. Finished
        # shards are kept whatever happens (storage down, a crash, bad data late in the run):
        # they may be hours of GPU work, and the same command resumes them once the cause is gone.
        if started_library and isinstance(user_error_in(exc), DataError) and not finished_shards(root):
            _withdraw_library(root, created_dir)
        raise
    missing = [s.shard_id for s in plan if s.shard_id not in finished_shards(root)]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) unfinished: {', '.join(missing[:5])}")
    # A worker lost mid-shard leaves its temporary directory; every shard is done, so it is garbage.
    _clean_partials(root)
    counts = write_library_files(root, recipe, plan)
    return LibraryResult(root, sum(counts.values()), len(plan), len(pending), counts,
                         round(time.perf_counter() - started, 3))


def _progress_bar(total: int, progress: bool, desc: str = "synthesis", unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, smoothing=0.1)


def _run_local(recipe, root, pending, embeddings, progress) -> None:
    writer = ShardWriter(recipe, root, embeddings)
    bar = _progress_bar(sum(len(s.items) for s in pending), progress)
    for shard in pending:
        writer.write(shard)
        bar.update(len(shard.items))
    bar.close()


# --- on Ray --------------------------------------------------------------------------------------


def _connect_ray(recipe: Recipe):
    import ray

    if not ray.is_initialized():
        ray.init(address=recipe.ray.address, include_dashboard=False, log_to_driver=False)
    return ray


def _gpu_share(recipe: Recipe, requested: float | None) -> float:
    """A GPU fraction as the recipe asks; unset: a whole GPU for AnoGen when the cluster has any."""
    import ray

    if requested is not None:
        return requested
    needs_gpu = any(d.generator == "anogen" for d in recipe.defects)
    return 1.0 if needs_gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _runtime_env() -> dict:
    """Workers reach the same object store (output, s3:// normals and pipelines) as this process."""
    env = storage.storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def _learn_on_ray(recipe: Recipe, root: str, defects: list[DefectRecipe], progress: bool) -> None:
    """One Ray task per type, all at once, each with the recipe's learning GPU share. A task whose
    worker dies is retried by Ray; it resumes from its checkpoints when it lands on the same node."""
    ray = _connect_ray(recipe)
    wanted = recipe.ray.learn_gpus if recipe.ray.learn_gpus is not None else recipe.ray.num_gpus
    gpus = _gpu_share(recipe, wanted)
    task = ray.remote(_learn_task).options(num_cpus=recipe.ray.num_cpus, num_gpus=gpus,
                                           max_retries=recipe.ray.max_retries, retry_exceptions=False,
                                           **_runtime_env())
    recipe_json = recipe.model_dump(mode="json")
    # No GPU granted: say cpu, so a node that has one idle does not get used behind Ray's back.
    device = "auto" if gpus > 0 else "cpu"
    names = {task.remote(recipe_json, root, d.name, device, learned_from_key(recipe, d)): d.name for d in defects}
    waiting = list(names)
    bar = _progress_bar(len(names), progress, desc="learn embeddings", unit="type")
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.WorkerCrashedError as exc:
                raise RuntimeError(f"learning the {names[ready[0]]} embedding lost its worker "
                                   f"{recipe.ray.max_retries + 1} times; giving up") from exc
            bar.update(1)
    finally:
        bar.close()
        for ref in waiting:
            ray.cancel(ref, force=True)


def _learn_task(recipe_json: dict, root: str, name: str, device: str, key: str | None = None) -> str:
    """Ray task body: learn one type's embedding on the node Ray chose and write it into the library."""
    import torch

    recipe = Recipe.model_validate(recipe_json)
    # As many threads as CPUs granted, so tasks sharing a node do not oversubscribe it.
    torch.set_num_threads(max(1, int(recipe.ray.num_cpus)))
    defect = next(d for d in recipe.defects if d.name == name)
    fault = recipe.ray.fault_injection
    on_step = (_kill_after(fault.kill_after_learn_steps, fault.once)
               if fault and fault.kill_after_learn_steps else None)
    return learn_library_embedding(recipe, root, defect, progress=False, device=device, on_step=on_step, key=key)


def _run_ray(recipe, root, pending, embeddings, progress, actors: int) -> None:
    """Shards go to a pool of actors, two in flight per actor so none idles between shards. A shard
    whose actor died is handed to a fresh actor; a shard is only ever visible once, finished."""
    ray = _connect_ray(recipe)
    Worker = ray.remote(_ShardActor)
    options = {"num_cpus": recipe.ray.num_cpus, "num_gpus": _gpu_share(recipe, recipe.ray.num_gpus),
               **_runtime_env()}
    count = max(1, min(actors, len(pending)))
    recipe_json = recipe.model_dump(mode="json")
    max_retries = recipe.ray.max_retries

    def spawn():
        return Worker.options(**options, max_concurrency=1).remote(recipe_json, str(root), embeddings)

    pool = [spawn() for _ in range(count)]
    queue = list(pending)
    in_flight: dict[Any, tuple[int, ShardPlan, Any]] = {}
    retries: dict[str, int] = {}
    bar = _progress_bar(sum(len(s.items) for s in pending), progress)
    from anomalyfleet.job_metrics import JobMetrics

    # Images done, rate and ETA on the Jobs dashboard (and the stalled-job alert), beside the bar.
    metrics = JobMetrics(recipe.name, kind="synthesis", total=sum(len(s.items) for s in pending))

    # Shards go only to actors that have started, two at a time: an actor the cluster cannot place
    # (more actors than CPUs or GPUs, a node gone) would otherwise hold its shards forever while the
    # others run dry. `started` holds the slots whose current actor has started.
    started: set[int] = set()

    def load(slot: int) -> int:
        return sum(1 for s, _, a in in_flight.values() if s == slot and a is pool[slot])

    def fill() -> None:
        """Give queued shards to started actors with fewer than two in flight."""
        for slot in sorted(started):
            while queue and load(slot) < 2:
                shard = queue.pop(0)
                in_flight[pool[slot].write.remote(shard)] = (slot, shard, pool[slot])

    def replace_actor(slot: int) -> None:
        started.discard(slot)
        ray.kill(pool[slot])
        pool[slot] = spawn()
        starting[pool[slot].__ray_ready__.remote()] = (slot, pool[slot])

    starting: dict[Any, tuple[int, Any]] = {actor.__ray_ready__.remote(): (slot, actor) for slot, actor in enumerate(pool)}
    failed_starts = 0
    try:
        while in_flight or (queue and starting):
            ready, _ = ray.wait([*in_flight, *starting], num_returns=1)
            ref = ready[0]
            if ref in starting:
                slot, actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    failed_starts += 1
                    if user_error_in(exc) is not None or failed_starts > max_retries + count:
                        raise  # a bad recipe fails every actor the same way; do not retry it
                    if pool[slot] is actor:
                        replace_actor(slot)
                    continue
                if pool[slot] is actor:
                    started.add(slot)
                fill()
                continue
            slot, shard, actor = in_flight.pop(ref)
            try:
                ray.get(ref)
                bar.update(len(shard.items))
                metrics.advance(images=len(shard.items))
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                retries[shard.shard_id] = retries.get(shard.shard_id, 0) + 1
                if retries[shard.shard_id] > max_retries:
                    raise RuntimeError(f"shard {shard.shard_id} lost its worker {max_retries + 1} times; "
                                       "giving up (ray.max_retries)") from exc
                bar.write(f"worker lost on shard {shard.shard_id}; retrying on a new worker")
                queue.insert(0, shard)
                # Replace the actor once, not once per shard it had in flight; the shard goes to
                # whichever started actor has room first (the replacement too, once it starts).
                if pool[slot] is actor:
                    replace_actor(slot)
            fill()
        metrics.finish()
    finally:
        metrics.close()
        bar.close()
        # Killing the actors fails whatever is still queued on them. (Actor tasks cannot be
        # force-cancelled: Ray raises ValueError, which here would hide the error that got us here
        # and leave the actors running.)
        for actor in pool:
            ray.kill(actor)


class _ShardActor:
    """Ray actor body: loads generators once and writes shards until the pool is torn down."""

    def __init__(self, recipe_json: dict, root: str, embeddings: dict[str, str]):
        import torch

        torch.set_num_threads(1)  # one thread per actor: actors, not threads, share out the cores
        recipe = Recipe.model_validate(recipe_json)
        fault = recipe.ray.fault_injection
        after_image = (_kill_after(fault.kill_after_images, fault.once)
                       if fault and fault.kill_after_images else None)
        self.writer = ShardWriter(recipe, root, embeddings, after_image=after_image)

    def write(self, shard: ShardPlan) -> dict:
        return self.writer.write(shard)


def _kill_after(count: int, once: str | None) -> Callable[..., None]:
    """Fault injection (see FaultInjection): a callable that SIGKILLs this process on its count-th call."""
    import signal

    calls = 0

    def hook(*_) -> None:
        nonlocal calls
        calls += 1
        if calls != count:
            return
        if once is not None:
            try:
                marker = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # another worker has died for this run already
            os.write(marker, str(os.getpid()).encode())
            os.close(marker)
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


# --- the finished library ------------------------------------------------------------------------


def _read_many(uris: list[str]) -> list[bytes]:
    """Objects in order; fetched in parallel (one request each in object storage)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(storage.read_bytes, uris))


def read_rows(root: str | Path, shard_ids: list[str]) -> list[dict]:
    rows = []
    for raw in _read_many([storage.join(str(root), SHARDS, i, "manifest.jsonl") for i in shard_ids]):
        rows += [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return rows


def write_library_files(root: str | Path, recipe: Recipe, plan: list[ShardPlan]) -> dict[str, int]:
    """manifest.jsonl, the card and the contact sheet, from the finished shards. The manifest, which
    makes the root readable as `library:`, goes last."""
    root = str(root)
    ids = [s.shard_id for s in plan]
    rows = read_rows(root, ids)
    manifest = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    counts = {d.name: 0 for d in recipe.defects}
    for row in rows:
        counts[row["defect_type"]] += 1
    versions: dict[str, dict] = {}
    mixed: dict[str, list[dict]] = {}
    for raw in _read_many([storage.join(root, SHARDS, i, "shard.json") for i in ids]):
        info = json.loads(raw)
        first = versions.setdefault(info["generator"], info["versions"])
        seen = mixed.setdefault(info["generator"], [first])
        if info["versions"] not in seen:
            seen.append(info["versions"])
    # A run resumed after an upgrade holds shards of two versions: the card says so.
    mixed = {name: found for name, found in mixed.items() if len(found) > 1}
    for name, found in mixed.items():
        print(f"warning: the {name} shards of {root} were made by {len(found)} different versions "
              "(a run resumed after an upgrade); card.json lists them under mixed_versions", file=sys.stderr)
    card = {
        "name": recipe.name, "images": len(rows), "counts": counts, "generators": versions,
        **({"mixed_versions": mixed} if mixed else {}),
        "python": sys.version.split()[0], "recipe": recipe.content(), "output": recipe.output,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "contact_sheet": "contact-sheet.png",
    }
    storage.write_bytes(storage.join(root, "card.json"), json.dumps(card, indent=1, sort_keys=True).encode())
    storage.write_bytes(storage.join(root, "card.md"), _card_markdown(card, recipe).encode())
    storage.write_bytes(storage.join(root, "contact-sheet.png"), _png_bytes(contact_sheet(root, rows)))
    storage.write_bytes(storage.join(root, "manifest.jsonl"), manifest)
    return counts


def _card_markdown(card: dict, recipe: Recipe) -> str:
    lines = [f"# Defect library: {card['name']}", "",
             f"{card['images']} synthetic defect images with pixel masks, made by anomalyfleet "
             f"{anomalyfleet.__version__} from the recipe below. Use it as `library:<this directory>`.", "",
             "| defect type | generator | count | region |", "| --- | --- | --- | --- |"]
    for d in recipe.defects:
        region = d.region_spec() or "generator default"
        if isinstance(region, RegionSpec):
            region = f"{region.shape}, size {list(region.size)}, aspect {list(region.aspect)}, rotation {list(region.rotation)}"
        lines.append(f"| {d.name} | {d.generator} | {card['counts'][d.name]} | {region} |")
    lines += ["", "## Generator versions", ""]
    for name, versions in card["generators"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(card["recipe"], sort_keys=False).rstrip(), "```", "",
              "![contact sheet](contact-sheet.png)", ""]
    return "\n".join(lines)


def contact_sheet(root: str | Path, rows: list[dict], per_type: int = 6, tile: int = 128) -> np.ndarray:
    """Up to `per_type` samples of each type side by side, the mask outline drawn in red, one row per type."""
    from PIL import ImageDraw
    from scipy import ndimage

    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["defect_type"], []).append(row)
    # Spread the picks over each type so the sheet shows its variety, not its first shard.
    picks = {name: [items[i] for i in np.linspace(0, len(items) - 1, min(per_type, len(items))).round().astype(int)]
             for name, items in by_type.items()}
    # Every tile's image and mask in one parallel fetch (one request each in object storage).
    raw = iter(_read_many([storage.join(str(root), row[k]) for chosen in picks.values() for row in chosen
                           for k in ("image", "mask")]))
    label_h = 14
    sheet = np.full((max(1, len(by_type)) * (tile + label_h), per_type * tile, 3), 255, np.uint8)
    canvas = Image.fromarray(sheet)
    draw = ImageDraw.Draw(canvas)
    for r, (name, chosen) in enumerate(picks.items()):
        y = r * (tile + label_h)
        draw.text((2, y + 1), f"{name} ({len(by_type[name])})", fill=(0, 0, 0))
        for c in range(len(chosen)):
            image_raw, mask_raw = next(raw), next(raw)
            with Image.open(io.BytesIO(image_raw)) as handle:
                image = np.asarray(handle.convert("RGB").resize((tile, tile), Image.BILINEAR)).copy()
            with Image.open(io.BytesIO(mask_raw)) as handle:
                mask = np.asarray(handle.convert("L").resize((tile, tile), Image.NEAREST)) > 127
            edge = mask & ~ndimage.binary_erosion(mask)
            image[edge] = (255, 0, 0)
            canvas.paste(Image.fromarray(image), (c * tile, y + label_h))
    return np.asarray(canvas)
