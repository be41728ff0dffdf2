"""Bulk scoring on Ray Data: every image under storage prefixes, per production line, to Parquet.

The images of each line are cut into fixed shards (sorted order, `shard_size` images each). A Ray
Data pipeline hands shards to an actor pool whose actors load each line's detector once and score
in batches; every finished shard is one Parquet part written atomically. Re-running the same job
skips the parts that exist, so a killed job resumes where it stopped, and the summary per line is
built from all parts at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from anomalyfleet import storage
from anomalyfleet.errors import UNREADABLE, AnomalyFleetError, ConfigError, DataError, StorageError
from anomalyfleet.storage import ObjectNotFound

COLUMNS = ("line", "image", "score", "threshold", "anomalous", "map_uri", "detector_version", "width", "height")


def part_schema():
    """One schema for every part: inferred per part, a column that is all null in one part (no
    error, no maps) and text in another makes the parts unreadable as one dataset."""
    import pyarrow as pa

    return pa.schema([("line", pa.string()), ("image", pa.string()), ("score", pa.float64()),
                      ("threshold", pa.float64()), ("anomalous", pa.bool_()), ("map_uri", pa.string()),
                      ("detector_version", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("error", pa.string())])


@dataclass(frozen=True)
class LineInput:
    line: str
    images: str  # storage prefix (or one directory) of this line's images
    bundle: str
    threshold: float | None


@dataclass(frozen=True)
class BulkScoreConfig:
    inputs: tuple[LineInput, ...]
    output: str
    shard_size: int = 256
    batch_size: int = 8
    actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    write_maps: bool = True
    device: str = "auto"
    job_name: str = "bulk-score"  # the `job` label of the progress metrics
    # Batch zero-shot mode: score each line's images against each other in groups of at most this
    # many (anomalyfleet.batch_zero_shot), robust z-scores flagged from Z_THRESHOLD; None: the bundles.
    batch_zero_shot: int | None = None
    # Peers: the bundles score, each image's line memory completed with its peers among its line's
    # images in groups of at most this many (anomalyfleet.batch_zero_shot.predict_samples_with_peers).
    # Either way the groups are formed per line as `score` forms them, and kept whole in shards.
    peers: int | None = None

    def validate(self) -> "BulkScoreConfig":
        if not self.inputs:
            raise ConfigError("nothing to score: give at least one line and its images")
        names = [i.line for i in self.inputs]
        if len(set(names)) != len(names):
            raise ConfigError("a line is listed twice")
        if self.shard_size < 1 or self.batch_size < 1 or self.actors < 1:
            raise ConfigError("shard size, batch size and actors must be at least 1")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor < 0:
            raise ConfigError("actor resources cannot be negative")
        if self.peers is not None and self.batch_zero_shot is not None:
            raise ConfigError("batch zero-shot scoring uses no line memory and peers complete one: choose one of them")
        if self.group_size is not None:
            from anomalyfleet.batch_zero_shot import check_group_size

            try:
                check_group_size(self.group_size, self.group_mode)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
        return self

    @property
    def group_size(self) -> int | None:
        """Images per group when images are scored in groups (peers or batch zero-shot), else None."""
        return self.peers if self.peers is not None else self.batch_zero_shot

    @property
    def group_mode(self) -> str:
        return "peers" if self.peers is not None else "batch zero-shot"

    @cached_property
    def bundle_metadata(self) -> dict[str, dict]:
        """Each line bundle's metadata, read once per bundle for the checks before a run (for an
        s3:// bundle, a remote read)."""
        from anomalyfleet.bundle import read_bundle_metadata

        return {uri: read_bundle_metadata(uri) for uri in dict.fromkeys(item.bundle for item in self.inputs)}

    def check_peers(self) -> None:
        """With peers, every line's bundle must have an active line memory: read from each bundle's
        metadata before any actor starts, so a wrong bundle is one line, not a failure per shard."""
        if self.peers is None:
            return
        from anomalyfleet.batch_zero_shot import memory_mode_problem

        for item in self.inputs:
            memory = self.bundle_metadata[item.bundle].get("memory")
            problem = memory_mode_problem(None if memory is None else (memory.get("fusion") or {}).get("mode", "fused"))
            if problem:
                raise ConfigError(f"line {item.line} ({item.bundle}): {problem}")


@dataclass
class Shard:
    line: str
    index: int
    bundle: str
    threshold: float | None
    images: list[str] = field(default_factory=list)
    batch_zero_shot: int | None = None
    peers: int | None = None
    # Sizes of the consecutive groups the shard's images are scored in (peers, batch zero-shot): the
    # line's groups as `score` makes them from the whole line, whole groups per shard.
    groups: list[int] | None = None
    # The bundle's manifest version when the run was planned: a bundle saved again at the same
    # path gives new part names (a rerun after retraining never keeps the old detector's parts),
    # and an actor that loads another version refuses the shard.
    version: str | None = None
    # Whether the part's rows point to saved maps: a run with maps after one without redoes the part.
    maps: bool = True

    @property
    def digest(self) -> str:
        # The part name carries the shard's content, so a changed prefix never reuses a stale part.
        what = [self.bundle, self.threshold, self.images]
        if self.version is not None:
            what.append({"bundle_version": self.version})
        if self.batch_zero_shot is not None:  # parts written before the mode existed keep their names
            what.append(self.batch_zero_shot)
        if self.peers is not None:
            what.append({"peers": self.peers})
        if self.groups is not None:
            what.append({"groups": self.groups})
        if not self.maps:  # (parts with maps keep the names they had before this field)
            what.append({"maps": False})
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]

    @property
    def part_name(self) -> str:
        """The part's path under the output."""
        return f"parts/{self.line}/part-{self.index:05d}-{self.digest}.parquet"

    def part_uri(self, output: str) -> str:
        return storage.join(output, *self.part_name.split("/"))


def resolve_inputs(pairs: list[str], registry: str | None, detector: str | None) -> tuple[LineInput, ...]:
    """`LINE=URI` pairs; each line's bundle and threshold from the line registry, or `detector`."""
    lines = []
    snapshot = None
    if registry:
        from anomalyfleet.serving.registry import LineRegistry

        snapshot = LineRegistry(registry).load()
    from anomalyfleet.serving.registry import LINE_NAME

    if detector == "default":  # the bundled detector, as every other command reads --detector
        from anomalyfleet.cli import resolve_detector

        detector = resolve_detector(detector)
    bundle_threshold = None
    if snapshot is None and detector and pairs:  # one bundle for every line: its metadata read once
        from anomalyfleet.bundle import read_bundle_metadata

        bundle_threshold = (read_bundle_metadata(detector).get("thresholds") or {}).get("image")
    for pair in pairs:
        line, sep, uri = pair.partition("=")
        if not sep or not line or not uri:
            raise ConfigError(f"expected LINE=URI, got {pair!r}")
        if not LINE_NAME.match(line):
            # The line names output directories (parts/<line>, maps/<line>): no paths, no '..'.
            raise ConfigError(f"invalid line name {line!r}: letters, digits, '.', '_' and '-' only, "
                              "starting with a letter or digit")
        if snapshot is not None:
            if line in snapshot.errors:
                raise ConfigError(f"line {line!r} is in the registry but cannot be used: {snapshot.errors[line]}")
            if line not in snapshot.lines:
                raise ConfigError(f"unknown line {line!r}: not in the registry")
            state = snapshot.lines[line]
            lines.append(LineInput(line, uri, state.bundle_uri, state.threshold))
        elif detector:
            lines.append(LineInput(line, uri, detector, bundle_threshold))
        else:
            raise ConfigError("give --registry (lines -> bundles) or --detector")
    return tuple(lines)


def list_line_images(uri: str) -> list[str]:
    """Image URIs under a prefix (listed, not fetched: actors read each image themselves); [] for an
    empty prefix or directory (a line that made no images today). A local path that does not exist
    is an error: it is a typo, not a quiet line."""
    from anomalyfleet.scoring import IMAGE_SUFFIXES, list_images

    if not storage.is_remote(uri):
        return [str(p) for p in list_images(uri, allow_empty=True)]
    # Ordered by path components, as `score` orders files (its groups, and so peers' and batch
    # zero-shot scores, depend on the order): "cam/" before "cam-2/", which plain text reverses.
    return sorted((o.uri for o in storage.list_objects(uri) if Path(o.uri).suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda u: u.split("/"))


def empty_lines(config: BulkScoreConfig, shards: list[Shard]) -> dict[str, str]:
    """{line: prefix} of the inputs that hold no image. One quiet line must not stop a run over every
    line of a factory; a run where no line has an image is an error."""
    planned = {s.line for s in shards}
    empty = {item.line: item.images for item in config.inputs if item.line not in planned}
    if len(empty) == len(config.inputs):
        raise DataError("no images (png, jpg, bmp, tif) under " + ", ".join(sorted(set(empty.values()))))
    return empty


def plan_shards(config: BulkScoreConfig) -> list[Shard]:
    shards = []
    for item in config.inputs:
        images = list_line_images(item.images)
        if not images:
            continue  # a quiet line: reported by empty_lines, and no group to form
        version = config.bundle_metadata[item.bundle]["_version"]
        if config.group_size is None:
            for index, start in enumerate(range(0, len(images), config.shard_size)):
                shards.append(Shard(item.line, index, item.bundle, item.threshold,
                                    images[start:start + config.shard_size], version=version, maps=config.write_maps))
            continue
        from anomalyfleet.batch_zero_shot import group_bounds
        from anomalyfleet.rolling_window import Z_THRESHOLD

        # The line's groups exactly as `score --peers/--batch-zero-shot` forms them from the same
        # files, packed whole into shards of at most shard_size images (one group when it is larger).
        threshold = item.threshold if config.peers is not None else Z_THRESHOLD
        packed: list[list[tuple[int, int]]] = []
        for start, stop in group_bounds(len(images), config.group_size, config.group_mode):
            if packed and stop - packed[-1][0][0] <= config.shard_size:
                packed[-1].append((start, stop))
            else:
                packed.append([(start, stop)])
        for index, groups in enumerate(packed):
            shards.append(Shard(item.line, index, item.bundle, threshold, images[groups[0][0]:groups[-1][1]],
                                config.batch_zero_shot, config.peers, [b - a for a, b in groups], version,
                                config.write_maps))
    return shards


def _read_image(uri: str):
    """(decoded RGB image, None), or (None, why) for an image that is a row error, not the job's:
    corrupt, too large to decode, or gone since the listing. One such image in a million must not
    stop the run, nor every re-run."""
    from PIL import Image

    from anomalyfleet.data.transforms import load_image

    try:
        return load_image(io.BytesIO(storage.read_bytes(uri))), None
    except DataError:
        return None, UNREADABLE
    except Image.DecompressionBombError:
        return None, f"too many pixels to decode (over {Image.MAX_IMAGE_PIXELS * 2})"
    except ObjectNotFound:
        return None, "gone since the prefix was listed"


class ShardScorer:
    """One actor: detectors loaded once per bundle, shards scored in batches, parts written atomically."""

    def __init__(self, output: str, batch_size: int, write_maps: bool, device: str):
        from anomalyfleet.device import select_device

        self.output = output
        self.batch_size = batch_size
        self.write_maps = write_maps
        self.detectors = {}
        self.backbones: dict[tuple, object] = {}
        try:
            self.device = select_device(device)
            self._refused: AnomalyFleetError | None = None
        except AnomalyFleetError as exc:
            # Raised from the first call instead: Ray keeps a task's exception for the driver, but
            # turns a constructor's into an ActorDiedError holding only its traceback text.
            self.device, self._refused = None, exc

    def _detector(self, bundle: str):
        from anomalyfleet.bundle import backbone_key, load_bundle, read_bundle

        if bundle not in self.detectors:
            # One backbone per actor for all the lines whose bundles share it (as the service does):
            # with many lines, a backbone per bundle in every actor runs out of memory.
            contents = read_bundle(bundle)
            key = backbone_key(contents.meta)
            detector = load_bundle(bundle, device=self.device, backbone=self.backbones.get(key), contents=contents)
            self.backbones.setdefault(key, detector.backbone)
            # The version of the very state load_bundle parsed (its manifest's digest).
            self.detectors[bundle] = (detector, detector.metadata["bundle_version"])
        return self.detectors[bundle]

    def score_shard(self, shard: Shard) -> dict:
        import torch

        from anomalyfleet.data.transforms import preprocess_image

        detector, version = self._detector(shard.bundle)
        if detector.backbone.image_size != detector.image_size:
            detector.backbone.set_image_size(detector.image_size)  # a shared backbone: another line's size
        if shard.version is not None and version != shard.version:
            raise DataError(f"bundle {shard.bundle} was saved again during the run (planned with version "
                            f"{shard.version}, this worker loaded {version}); run the command again")
        rows = {name: [] for name in COLUMNS}
        rows["error"] = []
        if shard.batch_zero_shot is not None or shard.peers is not None:
            self._score_groups(shard, detector, version, rows)
            return self._write_part(shard, rows)
        text = None
        for start in range(0, len(shard.images), self.batch_size):
            uris = shard.images[start : start + self.batch_size]
            images, why = zip(*(_read_image(u) for u in uris))
            good = [i for i, im in enumerate(images) if im is not None]
            scores, maps = {}, {}
            if good:
                batch = torch.stack([preprocess_image(images[i], detector.image_size, detector.mean, detector.std) for i in good])
                with torch.inference_mode():
                    text = detector.text_features() if text is None else text
                    prediction = detector.predict_features(detector.extract(batch.to(detector.device)), text)
                for row, i in enumerate(good):
                    scores[i] = float(prediction.scores[row])
                    maps[i] = prediction.maps[row].astype(np.float32)
            for i, uri in enumerate(uris):
                self._add_row(rows, shard, version, start + i, uri, images[i], scores.get(i), maps.get(i),
                              why[i] or UNREADABLE)
        return self._write_part(shard, rows)

    def _add_row(self, rows: dict, shard: Shard, version: str, position: int, uri: str, image, score: float | None,
                 amap: np.ndarray | None, error: str = UNREADABLE) -> None:
        ok = score is not None
        map_uri = None
        if ok and self.write_maps:
            # Named by the part's digest: another run's part (other settings, another bundle version)
            # never overwrites the maps this part points to.
            map_uri = storage.join(self.output, "maps", shard.line,
                                   f"{shard.index:05d}-{shard.digest}-{position:05d}.npy")
            buffer = io.BytesIO()
            np.save(buffer, amap)
            storage.write_bytes(map_uri, buffer.getvalue())
        rows["line"].append(shard.line)
        rows["image"].append(uri)
        rows["score"].append(score if ok else float("nan"))
        rows["threshold"].append(shard.threshold)
        # No score or no threshold, no decision (null), as `score` leaves it out: not "normal".
        rows["anomalous"].append(None if not ok or shard.threshold is None else bool(score >= shard.threshold))
        rows["map_uri"].append(map_uri)
        rows["detector_version"].append(version)
        rows["width"].append(image.width if ok else None)
        rows["height"].append(image.height if ok else None)
        rows["error"].append(None if ok else error)

    def _score_groups(self, shard: Shard, detector, version: str, rows: dict) -> None:
        """The readable images of each of the shard's groups, scored against each other (batch
        zero-shot) or by the bundle with each other as peers; unreadable ones are error rows, and so
        are the images of a group left with too few readable ones to compare."""
        import torch

        from anomalyfleet.batch_zero_shot import MIN_GROUP, extract_group, predict_group_with_peers, score_group
        from anomalyfleet.data.transforms import preprocess_image

        images, why = zip(*(_read_image(u) for u in shard.images))
        scores, maps, errors = {}, {}, {i: reason for i, reason in enumerate(why) if reason}
        mode = "batch zero-shot" if shard.peers is None else "peers"
        edges = np.cumsum([0, *(shard.groups or [len(shard.images)])])
        for start, stop in zip(edges[:-1], edges[1:]):
            members = [i for i in range(start, stop) if images[i] is not None]
            if len(members) < MIN_GROUP:
                errors.update({i: f"only {len(members)} readable images in its group: {mode} needs {MIN_GROUP} "
                                  "to compare" for i in members})
                continue
            batches = (torch.stack([preprocess_image(images[i], detector.image_size, detector.mean, detector.std)
                                    for i in members[b:b + self.batch_size]])
                       for b in range(0, len(members), self.batch_size))
            if shard.peers is None:
                result = score_group(detector, batches, len(members))
            else:
                with torch.inference_mode():
                    result = predict_group_with_peers(detector, extract_group(detector, batches))
            for row, i in enumerate(members):
                scores[i], maps[i] = float(result.scores[row]), result.maps[row].astype(np.float32)
        for i, uri in enumerate(shard.images):
            error = errors.get(i, UNREADABLE)
            self._add_row(rows, shard, version, i, uri, images[i], scores.get(i), maps.get(i), error)

    def _write_part(self, shard: Shard, rows: dict) -> dict:
        import pyarrow as pa

        _write_table(shard.part_uri(self.output), pa.table(rows, schema=part_schema()))
        return {"line": shard.line, "images": len(shard.images)}

    def __call__(self, batch: dict) -> dict:
        if self._refused is not None:
            raise self._refused
        done = [self.score_shard(Shard(**json.loads(item))) for item in batch["shard"]]
        return {"line": np.array([d["line"] for d in done]), "images": np.array([d["images"] for d in done])}


def conform_table(table):
    """A part's table in the one part schema: parts written before it had one had their types
    inferred (a column all null in a part is of type null), so old and new would not read as one
    dataset. Returns (table, whether it had to change)."""
    import pyarrow as pa

    schema = part_schema()
    if table.schema.equals(schema):
        return table, False
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema), True


def _write_table(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())  # a whole object or file: a part's commit point


def conform_part(uri: str):
    """(the part's table, whether it was rewritten): a part not in the one schema is rewritten in it."""
    import pyarrow.parquet as pq

    table, changed = conform_table(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
    if changed:
        _write_table(uri, table)
    return table, changed


def summarize(output: str, shards: list[Shard]) -> dict:
    per_line: dict[str, dict] = {}
    for shard in shards:
        # Every part is read here anyway: one of an earlier run in an older schema is rewritten now.
        table, _ = conform_part(shard.part_uri(output))
        scores = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        stats = per_line.setdefault(shard.line, {"images": 0, "errors": 0, "anomalous": 0, "scores": []})
        stats["images"] += table.num_rows
        stats["errors"] += int(np.isnan(scores).sum())
        decided = table.column("anomalous").drop_null()
        stats["decided"] = stats.get("decided", 0) + len(decided)
        stats["anomalous"] += int(np.asarray(decided.to_numpy(zero_copy_only=False), dtype=bool).sum())
        stats["scores"].append(scores[~np.isnan(scores)])
    summary = {}
    for line, stats in sorted(per_line.items()):
        scores = np.concatenate(stats.pop("scores")) if stats["images"] else np.zeros(0)
        scored, decided = len(scores), stats.pop("decided", 0)
        summary[line] = {
            **stats,
            # Over the images decided: a line without a threshold has no rate, not a rate of 0.
            "anomaly_rate": stats["anomalous"] / decided if decided else None,
            "mean_score": float(scores.mean()) if scored else None,
            "p95_score": float(np.percentile(scores, 95)) if scored else None,
        }
    return summary


def check_writable(output: str) -> None:
    """Write and remove a probe object under `output`, so an unwritable directory, a missing bucket or
    wrong credentials fail here, in one line, and not in every actor once Ray has started."""
    probe = storage.join(output, f".write-check-{os.getpid()}-{time.time_ns()}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except StorageError as exc:
        raise StorageError(f"cannot write the results under {output}: {exc}") from None


def run_bulk_score(config: BulkScoreConfig, progress: bool = True) -> dict:
    """Score every shard that has no part yet; returns (and writes) the per-line summary."""
    import ray

    config.validate()
    config.check_peers()
    shards = plan_shards(config)
    empty = empty_lines(config, shards)
    for line, prefix in empty.items():
        print(f"warning: line {line}: no images under {prefix}; the other lines are scored", file=sys.stderr)
    todo = [s for s in shards if not storage.exists(s.part_uri(config.output))]
    started = time.perf_counter()
    if todo:
        check_writable(config.output)
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=progress)
        if not storage.is_remote(config.output) and sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
            print(f"warning: {config.output} is a local path and the Ray cluster has several nodes: each actor "
                  "writes its parts on its own node, unless this path is a file system all nodes share "
                  "(use s3:// otherwise)", file=sys.stderr)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        if not progress:
            # Quiet means quiet: Ray Data logs its start and a failed task's traceback itself; the
            # CLI says what went wrong in one line.
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        dataset = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in todo], override_num_blocks=len(todo))
        results = dataset.map_batches(
            ShardScorer,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.num_cpus_per_actor,
            num_gpus=config.num_gpus_per_actor,
            fn_constructor_kwargs={"output": config.output, "batch_size": config.batch_size,
                                   "write_maps": config.write_maps, "device": config.device},
            runtime_env={"env_vars": storage.storage_env()},
        )
        from anomalyfleet.job_metrics import JobMetrics

        # Progress for the Jobs dashboard and the stalled-job alert: one advance per finished shard.
        # This run's work only: counting earlier runs' shards as done in no time would make the
        # rate, and with it the ETA, absurd after a resume.
        with JobMetrics(config.job_name, kind="scoring", total=sum(len(s.images) for s in todo)) as metrics:
            done = 0
            for row in results.iter_rows():
                done += int(row["images"])
                metrics.advance(done=done, images=int(row["images"]))
            metrics.finish()
    parts = [s.part_uri(config.output) for s in shards]
    summary = {
        "lines": summarize(config.output, shards),
        # The parts of this run's results. parts/ may also hold parts of earlier runs on the same
        # output with other bundles, settings or images (kept: they are results too).
        "parts": [s.part_name for s in shards],
        "superseded_parts": _other_parts(config.output, set(parts)),
        "empty_lines": empty,
        "shards": len(shards),
        "shards_scored_now": len(todo),
        "seconds": time.perf_counter() - started,
        "inputs": [asdict(i) for i in config.inputs],
    }
    storage.write_bytes(storage.join(config.output, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def _other_parts(output: str, current: set[str]) -> int:
    root = storage.join(output, "parts")
    if not storage.is_remote(root) and not storage.parse(root).path.is_dir():
        return 0
    return sum(1 for info in storage.list_objects(root) if info.uri.endswith(".parquet") and info.uri not in current)


def format_summary(summary: dict) -> str:
    lines = [f"{'line':<16}{'images':>8}{'errors':>8}{'anomalous':>11}{'rate':>8}{'mean':>8}{'p95':>8}"]
    for line, s in summary["lines"].items():
        rate = "-" if s["anomaly_rate"] is None else f"{s['anomaly_rate']:.3f}"
        mean = "-" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
        p95 = "-" if s["p95_score"] is None else f"{s['p95_score']:.3f}"
        lines.append(f"{line:<16}{s['images']:>8}{s['errors']:>8}{s['anomalous']:>11}{rate:>8}{mean:>8}{p95:>8}")
    for line, prefix in summary.get("empty_lines", {}).items():
        lines.append(f"{line:<16}{'no images under ' + prefix}")
    lines.append(f"{summary['shards']} shards, {summary['shards_scored_now']} scored now, {summary['seconds']:.1f} s")
    if summary.get("superseded_parts"):
        lines.append(f"{summary['superseded_parts']} other part(s) under parts/ are from earlier runs with other "
                     "bundles, settings or images: this run's are listed in summary.json")
    return "\n".join(lines)


def add_bulk_arguments(parser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="LINE=URI",
                        help="a line and the storage prefix (or directory) of its images; repeatable")
    parser.add_argument("--registry", default=None, help="line registry (YAML/JSON, path or s3://): bundles and thresholds")
    parser.add_argument("--detector", default=None, help="one bundle for every line (instead of --registry)")
    parser.add_argument("--out", required=True, help="output prefix: parts/*.parquet, maps/, summary.json")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1, help="scoring actors (each loads the detectors once)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 0.25 packs four actors on a GPU")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--no-maps", action="store_true", help="scores only, no .npy maps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--job-name", default="bulk-score", help="label of the job's progress metrics")
    parser.add_argument("--batch-zero-shot", type=int, default=None, metavar="G",
                        help="no normal image needed: score each line's images against each other in groups of "
                             "up to G, formed as score forms them and kept whole in shards (robust z-scores, "
                             "anomalous from z = 3) instead of by the bundles")
    parser.add_argument("--peers", type=int, default=None, metavar="G",
                        help="bundles with a line memory: complete its distances with each image's peers, the other "
                             "images of its group of up to G, formed as score forms them (the bundles' scales and "
                             "thresholds)")
    parser.add_argument("--quiet", action="store_true")


def config_from_args(args) -> BulkScoreConfig:
    inputs = resolve_inputs(args.input, args.registry, args.detector)
    return BulkScoreConfig(
        inputs=inputs, output=args.out, shard_size=args.shard_size, batch_size=args.batch_size,
        actors=args.actors, num_gpus_per_actor=args.gpus_per_actor, num_cpus_per_actor=args.cpus_per_actor,
        write_maps=not args.no_maps, device=args.device, job_name=args.job_name,
        batch_zero_shot=args.batch_zero_shot, peers=args.peers,
    ).validate()


def thresholds_warnings(config: BulkScoreConfig) -> list[str]:
    """Lines whose bundle's thresholds were set the other way (with or without peers) than this run scores."""
    from anomalyfleet.calibration import thresholds_mismatch

    if config.batch_zero_shot:  # scores on the group's own scale: the bundle's thresholds are not used
        return []
    out = []
    for item in config.inputs:
        meta = config.bundle_metadata[item.bundle]
        thresholds = meta.get("thresholds") or {}
        if item.threshold is None or item.threshold != thresholds.get("image"):
            continue  # the line scores against a registry threshold (or none), not the bundle's
        reason = thresholds_mismatch(meta, thresholds, config.peers)
        if reason:
            out.append(f"line {item.line}: {reason}")
    return out


def warn_thresholds(config: BulkScoreConfig) -> None:
    """`thresholds_warnings` on stderr, one line each, before the run starts."""
    for warning in thresholds_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_bulk_score(args) -> int:
    config = config_from_args(args)
    warn_thresholds(config)
    summary = run_bulk_score(config, progress=not args.quiet)
    print(format_summary(summary))
    return 0
