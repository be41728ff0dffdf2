"""Line memory: training-free evidence from a production line's own images.

Two sources that need no defect examples:
- a few-shot *normal memory*: patch features of k normal images of the line (greedy coreset for
  large k); a patch's score is the cosine distance to its nearest normal patch;
- *batch mutual scoring* (as MuSc): with no normal image at all, every patch of an unlabelled batch
  is compared with the patches of the other images; its score is the mean of its smallest
  distances to them, so a minority of defective images in the batch does not pull normals up.
Both produce patch-grid maps that are upsampled and smoothed like the prompt maps, and are fused
with them on a common scale calibrated on normal images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalyfleet.errors import DataError


def nearest_distance(queries: Tensor, memory: Tensor, chunk: int = 4096) -> Tensor:
    """Cosine distance from each query (Q, D) to its nearest row of memory (M, D); both normalised.

    Batched matrix products in chunks keep memory bounded; runs on whatever device the inputs are.
    """
    out = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk].float() @ memory.float().t()
        out[start : start + chunk] = 1.0 - block.max(dim=1).values
    return out


def greedy_coreset(features: Tensor, size: int, seed: int = 0) -> Tensor:
    """Indices of a greedy k-center coreset of `size` rows (farthest-point sampling, cosine)."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = 1.0 - features @ features[chosen[0]]
    for _ in range(size - 1):
        index = int(distance.argmax())
        chosen.append(index)
        distance = torch.minimum(distance, 1.0 - features @ features[index])
    return torch.tensor(chosen)


@dataclass
class PatchMemory:
    """Normalised normal patch features of one line at one feature layer."""

    features: Tensor  # (M, D), L2-normalised
    layer: int
    grid: tuple[int, int]
    shots: int

    @classmethod
    def build(cls, patches: Tensor, layer: int, grid: tuple[int, int], max_size: int | None = None, seed: int = 0) -> "PatchMemory":
        """From (k, P, D) patch features of k normal images."""
        flat = F.normalize(patches.reshape(-1, patches.shape[-1]).float(), dim=-1)
        if max_size is not None and flat.shape[0] > max_size:
            flat = flat[greedy_coreset(flat, max_size, seed)]
        return cls(features=flat.contiguous(), layer=layer, grid=tuple(grid), shots=int(patches.shape[0]))

    def patch_scores(self, patches: Tensor) -> Tensor:
        """(B, P) distance of every patch of (B, P, D) to its nearest normal patch."""
        queries = F.normalize(patches.reshape(-1, patches.shape[-1]).float(), dim=-1)
        memory = self.features.to(queries.device)
        return nearest_distance(queries, memory).reshape(patches.shape[0], patches.shape[1])

    def state_dict(self) -> dict:
        return {"features": self.features.cpu(), "layer": self.layer, "grid": list(self.grid), "shots": self.shots}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PatchMemory":
        return cls(features=state["features"], layer=int(state["layer"]), grid=tuple(state["grid"]), shots=int(state["shots"]))


def mutual_patch_scores(patches: Tensor, fraction: float = 0.3) -> Tensor:
    """(B, P) batch zero-shot scores from (B, P, D) patches of B unlabelled images of one line.

    For every patch and every *other* image, the distance to that image's nearest patch; the score
    is the mean of the smallest `fraction` of those B - 1 distances (at least one), so defects that
    appear in a minority of the images do not make normal patches look anomalous.
    """
    batch = patches.shape[0]
    if batch < 2:
        raise ValueError("mutual scoring needs at least two images of the same line")
    normed = F.normalize(patches.float(), dim=-1)
    per_other = torch.empty(batch, patches.shape[1], batch - 1, device=patches.device)
    for i in range(batch):
        others = [j for j in range(batch) if j != i]
        for slot, j in enumerate(others):
            per_other[i, :, slot] = nearest_distance(normed[i], normed[j])
    keep = max(1, int(round(fraction * (batch - 1))))
    return per_other.sort(dim=-1).values[..., :keep].mean(dim=-1)


def upsample_patch_scores(scores: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """(B, P) patch scores to (B, size, size) maps, bilinear like the prompt maps."""
    maps = scores.reshape(scores.shape[0], 1, *grid)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class MapCalibration:
    """Affine scale that puts a source's maps on a common footing: (map - centre) / spread,
    with centre and spread measured on normal images (median and a high quantile's distance)."""

    centre: float
    spread: float

    @classmethod
    def fit(cls, normal_maps: Tensor, quantile: float = 0.99) -> "MapCalibration":
        values = normal_maps.float().flatten()
        if values.numel() > 2_000_000:  # quantile() has an input limit; a strided sample suffices
            values = values[:: values.numel() // 2_000_000 + 1]
        centre = float(values.median())
        spread = float(torch.quantile(values, quantile)) - centre
        return cls(centre=centre, spread=max(spread, 1e-6))

    def apply(self, maps: Tensor) -> Tensor:
        return (maps - self.centre) / self.spread

    def to_dict(self) -> dict:
        return {"centre": self.centre, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict) -> "MapCalibration":
        return cls(centre=float(data["centre"]), spread=float(data["spread"]))


def top_fraction_mean(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """(B,) image scores: mean of the top `fraction` of each map's pixels."""
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


# --- a line's memory inside a detector ------------------------------------------------------------

FUSION_MODES = ("fused", "memory", "prompts")


@dataclass(frozen=True)
class FusionSettings:
    """Which sources score a line, and how they combine.

    `fused`: per pixel, (1 - w) * calibrated memory map + w * calibrated prompt map; the image score
    is the mean of the fused map's top `top_fraction` pixels plus w * the calibrated prompt image
    score. `memory`: the calibrated memory map alone, image score from its top pixels. `prompts`:
    the learned prompts alone, exactly as without a memory.
    """

    mode: str = "fused"
    prompt_weight: float = 0.2
    top_fraction: float = 0.01

    def __post_init__(self):
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {', '.join(FUSION_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.prompt_weight <= 1.0:
            raise ValueError(f"prompt weight must be in [0, 1], got {self.prompt_weight}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top fraction must be in (0, 1], got {self.top_fraction}")

    @property
    def sources(self) -> dict[str, bool]:
        return {"prompts": self.mode in ("fused", "prompts"), "memory": self.mode in ("fused", "memory")}

    def to_dict(self) -> dict:
        return {"mode": self.mode, "prompt_weight": self.prompt_weight, "top_fraction": self.top_fraction,
                "sources": self.sources}

    @classmethod
    def from_dict(cls, data: dict) -> "FusionSettings":
        return cls(mode=str(data.get("mode", "fused")), prompt_weight=float(data.get("prompt_weight", 0.2)),
                   top_fraction=float(data.get("top_fraction", 0.01)))


class LineMemory(torch.nn.Module):
    """A line's normal patch memory at one or more feature blocks, with its fusion settings.

    The banks are buffers, so `detector.to(device)` moves them with the detector. The memory map is
    the mean over the memory's layers of each patch's distance to its nearest normal patch,
    upsampled like the prompt maps. `built_with` records the detector settings the features were
    taken at (image size, DPAM depth, prompt map layers): the calibrations only hold for those.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        banks: list[Tensor],
        grid: tuple[int, int],
        shots: int,
        built_with: dict,
        coreset: int | None = None,
        fusion: FusionSettings = FusionSettings(),
        memory_calibration: MapCalibration | None = None,
        prompt_calibration: MapCalibration | None = None,
        score_calibration: MapCalibration | None = None,
        info: dict | None = None,
    ):
        super().__init__()
        if len(layers) != len(banks) or not layers:
            raise ValueError("one bank per memory layer is needed")
        self.layers = tuple(int(x) for x in layers)
        for layer, bank in zip(self.layers, banks):
            self.register_buffer(f"bank_{layer}", bank.float().contiguous())
        self.grid = tuple(int(x) for x in grid)
        self.shots = int(shots)
        self.built_with = dict(built_with)
        self.coreset = coreset
        self.fusion = fusion
        self.memory_calibration = memory_calibration
        self.prompt_calibration = prompt_calibration
        self.score_calibration = score_calibration
        self.info = dict(info or {})

    def bank(self, layer: int) -> PatchMemory:
        return PatchMemory(features=getattr(self, f"bank_{layer}"), layer=layer, grid=self.grid, shots=self.shots)

    @property
    def active(self) -> bool:
        return self.fusion.mode != "prompts"

    def raw_maps(self, patches: list[Tensor], size: int) -> Tensor:
        """(B, size, size) memory maps from patch features (B, P, D), one per memory layer."""
        maps = [upsample_patch_scores(self.bank(layer).patch_scores(p), self.grid, size)
                for layer, p in zip(self.layers, patches)]
        return torch.stack(maps).mean(dim=0)

    def fuse(self, memory_raw: Tensor, prompt_scores: Tensor | None, prompt_raw: Tensor | None,
             sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B,), smoothed maps (B, S, S)) of the active mode from the sources' raw maps."""
        from anomalyfleet.maps import smooth_maps

        mem = self.memory_calibration.apply(memory_raw) if self.memory_calibration else memory_raw
        if self.fusion.mode == "memory":
            maps = smooth_maps(mem, sigma)
            return top_fraction_mean(torch.from_numpy(maps), self.fusion.top_fraction).numpy(), maps
        if None in (self.memory_calibration, self.prompt_calibration, self.score_calibration):
            raise ValueError("fused scoring needs calibrations of both sources (rebuild the memory)")
        w = self.fusion.prompt_weight
        fused = (1 - w) * mem + w * self.prompt_calibration.apply(prompt_raw.to(mem.device))
        maps = smooth_maps(fused, sigma)
        top = top_fraction_mean(torch.from_numpy(maps), self.fusion.top_fraction)
        scores = top + w * self.score_calibration.apply(prompt_scores.detach().float().cpu())
        return scores.numpy().astype(np.float32), maps

    # --- persistence: tensors in memory.pt, the rest in detector.json ---------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {f"layer_{layer}": getattr(self, f"bank_{layer}").detach().cpu().clone() for layer in self.layers}

    def metadata(self) -> dict:
        def cal(c: MapCalibration | None):
            return None if c is None else c.to_dict()

        return {
            "layers": list(self.layers),
            "grid": list(self.grid),
            "shots": self.shots,
            "coreset": self.coreset,
            "bank_sizes": {str(layer): int(getattr(self, f"bank_{layer}").shape[0]) for layer in self.layers},
            "built_with": self.built_with,
            "fusion": self.fusion.to_dict(),
            "calibration": {"memory_map": cal(self.memory_calibration), "prompt_map": cal(self.prompt_calibration),
                            "prompt_score": cal(self.score_calibration)},
            "info": self.info,
        }

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, Tensor]) -> "LineMemory":
        layers = tuple(int(x) for x in meta["layers"])
        missing = [layer for layer in layers if f"layer_{layer}" not in tensors]
        if missing:
            raise ValueError(f"memory.pt has no bank for layer(s) {missing}")
        calibration = meta.get("calibration") or {}

        def cal(key: str):
            data = calibration.get(key)
            return None if data is None else MapCalibration.from_dict(data)

        return cls(
            layers=layers, banks=[tensors[f"layer_{layer}"] for layer in layers], grid=tuple(meta["grid"]),
            shots=int(meta["shots"]), built_with=meta.get("built_with", {}), coreset=meta.get("coreset"),
            fusion=FusionSettings.from_dict(meta.get("fusion", {})), memory_calibration=cal("memory_map"),
            prompt_calibration=cal("prompt_map"), score_calibration=cal("prompt_score"), info=meta.get("info"),
        )

    def with_mode(self, mode: str) -> "LineMemory":
        self.fusion = FusionSettings(mode=mode, prompt_weight=self.fusion.prompt_weight,
                                     top_fraction=self.fusion.top_fraction)
        return self


def _chunked_maps(memory: LineMemory, patches: list[Tensor], size: int, chunk: int = 32) -> Tensor:
    n = patches[0].shape[0]
    return torch.cat([memory.raw_maps([p[s:s + chunk] for p in patches], size) for s in range(0, n, chunk)])


def leave_one_out_maps(patches: Tensor, grid: tuple[int, int], size: int, limit: int = 32) -> Tensor:
    """(n, size, size) maps of each of the first `limit` images against the other images' patches."""
    normed = F.normalize(patches.float(), dim=-1)
    maps = []
    for i in range(min(limit, normed.shape[0])):
        others = torch.cat([normed[:i], normed[i + 1:]]).reshape(-1, normed.shape[-1])
        maps.append(upsample_patch_scores(nearest_distance(normed[i], others)[None], grid, size))
    return torch.cat(maps)


def fit_line_memory(
    layers: tuple[int, ...],
    shot_patches: list[Tensor],
    grid: tuple[int, int],
    image_size: int,
    built_with: dict,
    calibration_patches: list[Tensor] | None = None,
    prompt_scores: Tensor | None = None,
    prompt_raw: Tensor | None = None,
    coreset: int | None = None,
    fusion: FusionSettings = FusionSettings(),
    seed: int = 0,
    info: dict | None = None,
) -> LineMemory:
    """A line memory from patch features of normal images (tensors only; see `build_line_memory`).

    shot_patches: per memory layer, (k, P, D) features of the k memory images. The memory map's
    scale is calibrated on `calibration_patches` (other normal images of the line) when given,
    else leave-one-out over the memory images (each against the others), else not at all (one
    image: fine for `memory` mode, refused for `fused`). The prompt map and score scales are
    calibrated on `prompt_raw` / `prompt_scores` of normal images.
    """
    banks = [PatchMemory.build(p, layer, grid, max_size=coreset, seed=seed).features for layer, p in zip(layers, shot_patches)]
    memory = LineMemory(layers, banks, grid, shots=int(shot_patches[0].shape[0]), built_with=built_with,
                        coreset=coreset, fusion=fusion, info=info)
    if calibration_patches is not None and calibration_patches[0].shape[0] > 0:
        memory.memory_calibration = MapCalibration.fit(_chunked_maps(memory, calibration_patches, image_size))
        how = f"{calibration_patches[0].shape[0]} held-out normal images"
    elif shot_patches[0].shape[0] >= 2:
        loo = torch.stack([leave_one_out_maps(p, grid, image_size) for p in shot_patches]).mean(dim=0)
        memory.memory_calibration = MapCalibration.fit(loo)
        how = f"leave-one-out over {min(32, shot_patches[0].shape[0])} memory images"
    else:
        how = None
    if prompt_raw is not None:
        memory.prompt_calibration = MapCalibration.fit(prompt_raw)
    if prompt_scores is not None:
        memory.score_calibration = MapCalibration.fit(prompt_scores)
    memory.info["memory_calibration"] = how
    if fusion.mode == "fused" and None in (memory.memory_calibration, memory.prompt_calibration, memory.score_calibration):
        raise DataError("fused mode needs at least two normal images (one memory image cannot calibrate "
                         "the memory map's scale); give more normal images or use --mode memory")
    return memory


PROMPT_CALIBRATION_MAPS = 64


def default_memory_layers(num_layers: int) -> tuple[int, ...]:
    """A middle block: measured better than the last ones for nearest-normal-patch distance
    (block 6 of the 12-block ViT-S on the Magnetic Tile held-out protocol)."""
    return (max(1, num_layers // 2),)


def build_line_memory(
    detector,
    samples,
    k: int | None = 16,
    coreset: int | None = None,
    layers: tuple[int, ...] | None = None,
    fusion: FusionSettings = FusionSettings(),
    calibration_images: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> LineMemory:
    """A line memory for `detector` from the normal (label 0) images among `samples`.

    k normal images (a seeded draw; all of them when k is None or larger) go into the memory; up to
    `calibration_images` other normal images calibrate the maps' scales (else leave-one-out over
    the memory images). Features come from the detector's frozen backbone at its own settings,
    batched, on the detector's device.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from anomalyfleet.data import AnomalyDataset

    normals = [s for s in samples if int(s.label) == 0]
    if not normals:
        raise DataError(f"no normal (label 0) images among the {len(samples)} images given; a line memory is "
                        "built from normal images only")
    layers = tuple(layers) if layers else default_memory_layers(detector.backbone.num_layers)
    bad = [layer for layer in layers if not 1 <= layer <= detector.backbone.num_layers]
    if bad:
        raise DataError(f"memory layers {bad} are outside 1..{detector.backbone.num_layers} for this backbone")
    order = torch.randperm(len(normals), generator=torch.Generator().manual_seed(seed)).tolist()
    k = len(normals) if k is None else min(k, len(normals))
    chosen = [normals[i] for i in order[:k]]
    held = [normals[i] for i in order[k:k + calibration_images]]
    map_layers = tuple(detector.settings.layers)
    wanted = map_layers + tuple(layer for layer in layers if layer not in map_layers)
    index = [wanted.index(layer) for layer in layers]

    dataset = AnomalyDataset(chosen + held, image_size=detector.image_size, mean=detector.mean, std=detector.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    patches: list[list[Tensor]] = [[] for _ in layers]
    prompt_scores, prompt_raw = [], []
    bar = tqdm(total=len(dataset), desc="memory", unit="img", disable=not progress)
    with torch.inference_mode():
        # The prompt scales are calibrated in every mode, so a bundle's mode can be switched later.
        text = detector.text_features()
        for batch in loader:
            features = detector.extract(batch["image"].to(detector.device), layers=wanted)
            for slot, i in enumerate(index):
                patches[slot].append(features.patch_features[i])
            s, raw = detector.score_features(features, text)
            prompt_scores.append(s)
            room = PROMPT_CALIBRATION_MAPS - sum(len(r) for r in prompt_raw)
            if room > 0:  # full-size maps: a few dozen images fix the scale
                prompt_raw.append(raw[:room])
            bar.update(batch["image"].shape[0])
    bar.close()
    stacked = [torch.cat(p) for p in patches]
    built_with = {"image_size": detector.settings.image_size, "dpam_layers": detector.settings.dpam_layers,
                  "layers": list(map_layers), "backbone_fingerprint": detector.backbone.fingerprint()}
    info = {"images": [s.image for s in chosen], "calibration_images": len(held), "seed": seed}
    return fit_line_memory(
        layers, [p[:k] for p in stacked], detector.backbone.grid, detector.image_size, built_with,
        calibration_patches=[p[k:] for p in stacked] if held else None,
        prompt_scores=torch.cat(prompt_scores), prompt_raw=torch.cat(prompt_raw),
        coreset=coreset, fusion=fusion, seed=seed, info=info,
    )
