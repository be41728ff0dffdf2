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

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalyfleet.errors import DataError
from anomalyfleet.maps import smooth_maps
from anomalyfleet.memory_views import DEFAULT_VIEWS, other_view_patches, view_bank_limit, view_names


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


# Largest temporary similarity block in image-to-image comparisons (float32 elements, 64 MB):
# bounds memory for large batches and wide rolling windows.
MUTUAL_BLOCK_ELEMENTS = 1 << 24


def nearest_both(queries: Tensor, window: Tensor, max_elements: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest-patch cosine distances between images, both ways, from one product per block.

    queries (B, P, D) and window (N, Q, D), L2-normalised. Returns `to_window` (B, N, P): each query
    patch's distance to the nearest patch of each window image, and `from_window` (N, B, Q): each
    window patch's distance to the nearest patch of each query image. Blocks hold at most
    `max_elements` similarities (default `MUTUAL_BLOCK_ELEMENTS`).
    """
    max_elements = MUTUAL_BLOCK_ELEMENTS if max_elements is None else max_elements
    b_all, p, d = queries.shape
    n_all, q = window.shape[0], window.shape[1]
    to_window = queries.new_empty(b_all, n_all, p)
    from_window = queries.new_empty(n_all, b_all, q)
    n_step = max(1, min(n_all, max_elements // (p * q)))
    b_step = max(1, min(b_all, max_elements // (p * q * n_step)))
    for b0 in range(0, b_all, b_step):
        block_q = queries[b0:b0 + b_step]
        b = block_q.shape[0]
        for n0 in range(0, n_all, n_step):
            block_w = window[n0:n0 + n_step]
            n = block_w.shape[0]
            sim = (block_q.reshape(b * p, d) @ block_w.reshape(n * q, d).t()).view(b, p, n, q)
            to_window[b0:b0 + b, n0:n0 + n] = (1.0 - sim.amax(dim=3)).permute(0, 2, 1)
            from_window[n0:n0 + n, b0:b0 + b] = (1.0 - sim.amax(dim=1)).permute(1, 0, 2)
    return to_window, from_window


def smallest_mean(distances: Tensor, fraction: float, others: int, dim: int) -> Tensor:
    """Mean of the smallest `round(fraction * others)` (at least one) values along `dim`.

    `others` is the number of real comparisons; any further entries along `dim` must be +inf (an
    image's distance to itself), which the smallest ones never include.
    """
    keep = max(1, int(round(fraction * others)))
    return distances.topk(keep, dim=dim, largest=False).values.mean(dim=dim)


def mutual_patch_scores(patches: Tensor, fraction: float = 0.3) -> Tensor:
    """(B, P) batch zero-shot scores from (B, P, D) patches of B unlabelled images of one line.

    For every patch and every *other* image, the distance to that image's nearest patch; the score
    is the mean of the smallest `fraction` of those B - 1 distances (at least one), so defects that
    appear in a minority of the images do not make normal patches look anomalous. Each pair of
    images shares one similarity product, read both ways (half the work of one per direction).
    """
    batch, per_image, _ = patches.shape
    if batch < 2:
        raise ValueError("mutual scoring needs at least two images of the same line")
    normed = F.normalize(patches.float(), dim=-1)
    per_other = torch.empty(batch, per_image, batch, device=patches.device)
    per_other.diagonal(dim1=0, dim2=2).fill_(float("inf"))  # an image is not compared with itself
    for i in range(batch - 1):
        to_later, from_later = nearest_both(normed[i:i + 1], normed[i + 1:])
        per_other[i, :, i + 1:] = to_later[0].t()
        per_other[i + 1:, :, i] = from_later[:, 0]
    return smallest_mean(per_other, fraction, batch - 1, dim=-1)


def peer_patch_scores(patches: list[Tensor], fraction: float = 0.3) -> Tensor:
    """(B, P) peer scores of B images of one line from their (B, P, D) patches at each memory layer:
    `mutual_patch_scores` within the batch, averaged over the layers as the memory's distances are.

    What `LineMemory.patch_scores(..., peers=)` combines with the memory. A defect on more than
    about `fraction` of the other images finds close patches among them and is taken for normal,
    as in batch zero-shot mode: peers suit streams where defects are a minority and vary.
    """
    return torch.stack([mutual_patch_scores(p, fraction) for p in patches]).mean(dim=0)


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
# Version of the fusion formulas a bundle records; 2: memory mode mixes its image score into its map;
# 3: the fused score may hold the prompt map's position-normalised evidence (`position_weight`);
# 4: the memory's image score may be read from its map normalised per position (`memory_position`);
# 5: the fused map may take the memory's image score instead of the fused one (`map_score`).
FUSION_RULES = 5
RULES_BEFORE_MEMORY_POSITION = 3  # recorded by settings that do not use the memory position share
RULES_BEFORE_MAP_SCORE = 4  # recorded by settings whose maps do not use `map_score` = "memory"
MAP_SCORES = ("memory", "fused")
# Position statistics: each position's variance is shrunk towards all positions' mean variance with
# the weight of this many images (see PositionStats), and not fitted from fewer images than this.
POSITION_PRIOR_IMAGES = 8
POSITION_MIN_IMAGES = 8


@dataclass
class PositionStats:
    """Centre and spread of the prompts' patch-grid map at each grid position, on a line's normal images.

    A line's camera sees its parts the same way every time, and the prompt map has a systematic
    response at some positions (image borders, busbars, fixtures) that the global calibration counts
    as anomalous in every image. Measured per position on the normal images, that response is
    subtracted and each position's own spread sets its scale. A variance from tens of images is
    noisy, and a position that happened to vary little would amplify any change there, so each
    position's variance is shrunk towards the mean variance of all positions, as if that had been
    seen on `prior` more images (the means are not: they are well estimated, and shrinking them would
    bring back the fixed response). Measured against shrinking both towards the whole map's
    statistics: as good or better on three products (0.0-0.5 image AUROC of the term alone).
    """

    mean: Tensor  # (P,)
    spread: Tensor  # (P,)

    @classmethod
    def fit(cls, normal_maps: Tensor, prior: float = POSITION_PRIOR_IMAGES) -> "PositionStats":
        maps = normal_maps.float()
        n = maps.shape[0]
        if n < 2:
            raise ValueError("position statistics need at least two normal images")
        var = maps.var(dim=0)
        shrunk = ((n - 1) * var + prior * var.mean()) / (n - 1 + prior)
        return cls(mean=maps.mean(dim=0), spread=shrunk.clamp_min(1e-12).sqrt())

    def apply(self, maps: Tensor, grid: tuple[int, int]) -> Tensor:
        """Position-normalised maps: (B, P) patch-grid maps as they are, (B, S, S) maps against the
        statistics upsampled like every map."""
        mean, spread = self.mean.to(maps.device, maps.dtype), self.spread.to(maps.device, maps.dtype)
        if maps.dim() == 3:
            size = maps.shape[-1]
            mean = upsample_patch_scores(mean[None], grid, size)[0]
            spread = upsample_patch_scores(spread[None], grid, size)[0]
        return (maps - mean) / spread


def leave_one_out_position_scores(normal_maps: Tensor, grid: tuple[int, int], size: int, sigma: float,
                                  fraction: float) -> Tensor:
    """(n,) position scores of each normal image under statistics fitted on the other images: the
    scale a new image's score is calibrated against (an image's own statistics would flatter it).
    Normalised exactly as scoring normalises a new image: its upsampled map against the upsampled
    statistics (`LineMemory.position_scores`)."""
    n = normal_maps.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool)
    raw = upsample_patch_scores(normal_maps.float(), grid, size)  # as the detector's raw prompt maps
    z = torch.stack([PositionStats.fit(normal_maps[keep[i]]).apply(raw[i:i + 1], grid)[0] for i in range(n)])
    return top_fraction_mean(torch.from_numpy(smooth_maps(z, sigma)), fraction)


@dataclass(frozen=True)
class FusionSettings:
    """Which sources score a line, and how they combine.

    Every map and score below is on its normal-calibrated scale (0: a typical normal pixel or
    image of the line, 1: the normals' 99th percentile), so the weights compare like with like.
    `fused`:
    - local evidence per pixel: (1 - v) * memory map + v * prompt map, v = `prompt_map_weight`;
    - image score: (1 - w - u) * the memory's image score + w * the prompts' global score + u * the
      top-`top_fraction` mean of the prompt map normalised per position on the line's normal images
      (`PositionStats`, rescaled on them), w = `prompt_weight`, u = `position_weight`;
    - the memory's image score: (1 - s) * the local map's top-`top_fraction` mean (rescaled on the
      line's normal images) + s * the top-`top_fraction` mean of the memory map normalised per
      position the same way, s = `memory_position`;
    - fused map: (1 - a) * local evidence + a * an image score, a = `image_evidence`: a pixel is as
      anomalous as its surroundings and its image (the ranking inside one image is the local
      evidence's). The image score is the memory's own (`map_score` "memory", the default) or the
      fused one ("fused", the formula of bundles before rules 5).
    `memory`: the calibrated memory map alone; with a > 0 its image score (with its position share
    s) is rescaled on the normals too and mixed into the map the same way (a = 0: the raw top-pixel
    score and map, s unused).
    `prompts`: the learned prompts alone, exactly as without a memory.

    Defaults, measured on three products with benchmarks/line_memory_products.py (Magnetic Tile's
    held-out defects, ELPV mono and poly cells; k = 1, 4 and 16, three draws each; memories without
    views, as built before `memory_views` became the default): the prompts
    carry image-level information only. A prompt map share lowered pixel AUROC everywhere
    (v = 0); mixing the image's score into its map raised the memory's own pixel AUROC by 9-10
    points on Magnetic Tile at block 8 (7-9 at block 6; a = 0.5, in both modes); w = 0.1 is the
    largest prompt share of those tried (0.05 ... 0.5) that lowered image AUROC on none of the three
    products at block 6, before the position terms. Where the prompts transfer well (Magnetic Tile) it adds 0.5-2 points of
    image AUROC; where they transfer badly (ELPV, 67-71 against the memory's 83-94) it changes
    little (at block 8, 0.1-0.2 below the memory alone at k >= 4). The position term carries what
    the global score loses on a framed product: the prompt map normalised per position reaches 86.5
    image AUROC alone on ELPV mono cells (the global score: 66.6); u = 0.1 was the largest u tried
    (0.05, 0.1, 0.2) that cost no product more than 0.1 at block 6, and at block 8 adds +0.2 to +0.8
    on Magnetic Tile and -0.2 to +0.2 on cells.
    The memory map has fixed places of its own: a patch far from every normal patch of the memory
    images is often one whose position varies most among normal images (cell edges and corners, a
    tile's border), so the memory's top pixels are partly where they always are. Normalised per
    position like the prompt map, the memory's image score rose on every product at k <= 4 (block 8:
    ELPV mono 89.5 -> 92.9 at k = 4, poly 87.5 -> 88.5, Magnetic Tile 80.0 -> 81.5; 85.8 -> 91.4 on
    mono cells with one memory image) and on poly cells at k = 16 (89.9 -> 91.0); it ties on mono
    cells at k = 16 and loses 0.5 on Magnetic Tile there, which the other terms make up (fused 84.4
    against 84.3 with s = 0). s = 1 did best of 0, 0.5 and 1 at k <= 4 but for poly cells at k = 4
    (0.1 below 0.5). It assumes one framing per line: on one memory for mono and poly cells
    together it cost 1.2 image AUROC against s = 0 (block 6). The normalised memory map
    is not used as a map: it lowered pixel AUROC and AUPRO on Magnetic Tile (the image score
    carries its gain into the map through a).
    The fused map takes the memory's image score, not the fused one: the fused score ranks images
    better, yet mixed into the map it cost Magnetic Tile 0.7-0.9 pixel AUROC and 0.5-0.7 AUPRO at
    k = 4 and 16 (and the synthetic-defect check 1.1-1.3 pixel AUROC; results-zero-shot-memory-224.txt,
    its "previous default" rows), as the prompts carry image-level evidence only; so the fused map is
    the memory's, and the fusion adds to the image score.
    The weights are chosen on those products' labels: defaults, not per-line optima (`memory set
    --prompt-weight / --position-weight / --memory-position`).
    """

    mode: str = "fused"
    prompt_weight: float = 0.1
    top_fraction: float = 0.01
    prompt_map_weight: float = 0.0
    image_evidence: float = 0.5
    position_weight: float = 0.1
    memory_position: float = 1.0
    map_score: str = "memory"

    def __post_init__(self):
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {', '.join(FUSION_MODES)}, got {self.mode!r}")
        if self.map_score not in MAP_SCORES:
            raise ValueError(f"map score must be one of {', '.join(MAP_SCORES)}, got {self.map_score!r}")
        for name in ("prompt_weight", "prompt_map_weight", "image_evidence", "position_weight", "memory_position"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be in [0, 1], got {value}")
        if self.prompt_weight + self.position_weight > 1.0 + 1e-9:
            raise ValueError(f"prompt weight + position weight must be at most 1 (the memory keeps the rest), got "
                             f"{self.prompt_weight} + {self.position_weight}: lower one of them (--position-weight)")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top fraction must be in (0, 1], got {self.top_fraction}")

    @property
    def calibrated_image_score(self) -> bool:
        """The memory's image score is put on the normal-calibrated scale: fused mode, or memory mode
        with image evidence (memory mode with a = 0 keeps the raw top-pixel score)."""
        return self.mode == "fused" or (self.mode == "memory" and self.image_evidence > 0)

    @property
    def uses_position_term(self) -> bool:
        """The prompts' position-normalised score enters the scores (only fused scores add it)."""
        return self.mode == "fused" and self.position_weight > 0

    @property
    def uses_memory_position(self) -> bool:
        """The memory position share enters the scores (it only shares a calibrated image score)."""
        return self.memory_position > 0 and self.calibrated_image_score

    @property
    def uses_memory_map_score(self) -> bool:
        """The fused map takes the memory's image score (rules 5); elsewhere `map_score` changes nothing."""
        return self.mode == "fused" and self.image_evidence > 0 and self.map_score == "memory"

    @property
    def sources(self) -> dict[str, bool]:
        return {"prompts": self.mode in ("fused", "prompts"), "memory": self.mode in ("fused", "memory")}

    def score_scale(self) -> tuple:
        """What the image scores' scale depends on: thresholds set under one value do not hold under another."""
        if self.mode == "prompts":
            return ("prompts",)
        share = self.memory_position if self.uses_memory_position else 0.0
        if self.mode == "memory":
            return ("memory", self.top_fraction, self.image_evidence > 0, share)
        return ("fused", self.prompt_weight, self.top_fraction, self.prompt_map_weight, self.image_evidence,
                self.position_weight, share)

    def map_scale(self) -> tuple:
        """What the maps' scale depends on (pixel thresholds), as `score_scale` for image scores. Since
        rules 5 the fused map is the memory mode's map: the prompts' weights do not reach it."""
        if self.mode == "prompts":
            return ("prompts",)
        a = self.image_evidence
        v = self.prompt_map_weight if self.mode == "fused" else 0.0
        if a > 0 and self.mode == "fused" and self.map_score == "fused":
            return ("fused score",) + self.score_scale()[1:]  # which holds v and a
        if a == 0:
            return ("memory map", v)
        share = self.memory_position if self.uses_memory_position else 0.0
        return ("memory map", v, a, self.top_fraction, share)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "prompt_weight": self.prompt_weight, "top_fraction": self.top_fraction,
                "prompt_map_weight": self.prompt_map_weight, "image_evidence": self.image_evidence,
                "position_weight": self.position_weight, "memory_position": self.memory_position,
                "map_score": self.map_score,
                # The oldest rules that score these settings alike: code from before the memory
                # position share (the map score) reads bundles that do not use it.
                "sources": self.sources, "rules": self.rules}

    @property
    def rules(self) -> int:
        if self.uses_memory_map_score:
            return FUSION_RULES
        return RULES_BEFORE_MAP_SCORE if self.uses_memory_position else RULES_BEFORE_MEMORY_POSITION

    @classmethod
    def from_dict(cls, data: dict) -> "FusionSettings":
        rules = int(data.get("rules", 1))
        if rules > FUSION_RULES:
            raise ValueError(f"the memory's fusion rules ({rules}) are newer than this anomalyfleet's ({FUSION_RULES}); "
                             f"upgrade anomalyfleet to score with it")
        weight = float(data.get("prompt_weight", 0.2))
        mode = str(data.get("mode", "fused"))
        evidence = float(data.get("image_evidence", 0.0))
        if mode == "memory" and rules < 2:
            # Before rules 2, memory mode ignored the stored image evidence: its scores and maps,
            # and the thresholds set on them, stay as they were.
            evidence = 0.0
        # Bundles from before the per-pair weights used one weight for the map and the score.
        # Bundles from before rules 3 (4) had no position term (no memory position share): 0 keeps
        # their scores. Before rules 5 the fused map took the fused score, and no map score was
        # recorded: such a bundle keeps that formula where it is used (fused with image evidence), and
        # takes today's default for a later switch where it is not. Since, every bundle records it.
        return cls(mode=mode, prompt_weight=weight, top_fraction=float(data.get("top_fraction", 0.01)),
                   prompt_map_weight=float(data.get("prompt_map_weight", weight)), image_evidence=evidence,
                   position_weight=float(data.get("position_weight", 0.0)),
                   memory_position=float(data.get("memory_position", 0.0)),
                   map_score=str(data.get("map_score", "fused" if rules <= RULES_BEFORE_MAP_SCORE and mode == "fused"
                                          and evidence > 0 else "memory")))


@dataclass
class CalibrationSet:
    """Patch-grid scores of the normal images that calibrated a line memory: enough to refit the
    image score's scale for any fusion settings later (`memory set`) without the images.

    memory: (n, P) memory patch scores (held-out images, or leave-one-out); prompt_map: (n, P) the
    prompts' anomaly map on the patch grid (summed over the map layers, before upsampling);
    prompt_score: (n,) the prompts' image scores. A few kilobytes per line.
    """

    memory: Tensor
    prompt_map: Tensor
    prompt_score: Tensor

    def __post_init__(self):
        n = self.memory.shape[0]
        if self.prompt_map.shape != self.memory.shape or self.prompt_score.shape != (n,):
            raise ValueError(f"calibration set shapes disagree: memory {tuple(self.memory.shape)}, prompt map "
                             f"{tuple(self.prompt_map.shape)}, prompt score {tuple(self.prompt_score.shape)}")

    def tensors(self) -> dict[str, Tensor]:
        return {"calibration_memory": self.memory.float().cpu(), "calibration_prompt_map": self.prompt_map.float().cpu(),
                "calibration_prompt_score": self.prompt_score.float().cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "CalibrationSet | None":
        if "calibration_memory" not in tensors:
            return None
        return cls(tensors["calibration_memory"], tensors["calibration_prompt_map"], tensors["calibration_prompt_score"])


def _share(score: Tensor, weight: float, share: Tensor | None, name: str) -> Tensor:
    """`score` with `weight` of it replaced by the calibrated (B,) `share`."""
    if weight == 0:
        return score
    if share is None:
        raise ValueError(f"a {name} above 0 needs its position scores")
    return (1 - weight) * score + weight * share.detach().float().cpu()


def fused_outputs(memory_map: Tensor, prompt_map: Tensor, prompt_score: Tensor, fusion: FusionSettings,
                  image_calibration: MapCalibration | None, sigma: float,
                  position_score: Tensor | None = None,
                  memory_position_score: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (B,), smoothed maps (B, S, S)) of `fused` mode from calibrated sources (see FusionSettings).

    Without `image_calibration` (memories built before it existed), their formula, unchanged: the
    score is the local map's top pixels + w * the prompt score, and the map is the local evidence.
    `position_score` / `memory_position_score` (B,), calibrated, are needed when the position
    weight / memory position share is above 0.
    """
    v, w, a, u = fusion.prompt_map_weight, fusion.prompt_weight, fusion.image_evidence, fusion.position_weight
    local = smooth_maps((1 - v) * memory_map + v * prompt_map.to(memory_map.device), sigma)
    top = top_fraction_mean(torch.from_numpy(local), fusion.top_fraction)
    prompt_score = prompt_score.detach().float().cpu()
    if image_calibration is None:
        return (top + w * prompt_score).numpy().astype(np.float32), local
    memory_score = _share(image_calibration.apply(top), fusion.memory_position, memory_position_score,
                          "memory position share")
    scores = (1 - w - u) * memory_score + w * prompt_score
    if u > 0:
        if position_score is None:
            raise ValueError("a position weight above 0 needs the position scores")
        scores = scores + u * position_score.detach().float().cpu()
    scores = scores.numpy().astype(np.float32)
    in_map = memory_score.numpy().astype(np.float32) if fusion.uses_memory_map_score else scores
    return scores, ((1 - a) * local + a * in_map[:, None, None]).astype(np.float32)


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
        image_calibration: MapCalibration | None = None,
        calibration_set: CalibrationSet | None = None,
        position_calibration: MapCalibration | None = None,
        memory_position_calibration: MapCalibration | None = None,
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
        self.image_calibration = image_calibration
        self.calibration_set = calibration_set
        self.position_calibration = position_calibration
        self.memory_position_calibration = memory_position_calibration
        self.info = dict(info or {})
        # Per calibration-set field, its position statistics and the calibration set they were fitted on.
        self._position_stats: dict[str, tuple[CalibrationSet, PositionStats]] = {}

    def bank(self, layer: int) -> PatchMemory:
        return PatchMemory(features=getattr(self, f"bank_{layer}"), layer=layer, grid=self.grid, shots=self.shots)

    @property
    def active(self) -> bool:
        return self.fusion.mode != "prompts"

    @property
    def can_fuse(self) -> bool:
        return None not in (self.memory_calibration, self.prompt_calibration, self.score_calibration)

    def patch_scores(self, patches: list[Tensor], peers: Tensor | None = None) -> Tensor:
        """(B, P) mean over the memory's layers of each patch's distance to its nearest normal patch.

        With `peers` (B, P), the images' mutual scores among other images of the line at the same
        layers (`peer_patch_scores`, or a rolling window's `patch_scores`), each patch keeps the
        smaller of the two: variation of the line's normal images that the memory's few images lack
        is found among the peers, while a defect, absent from most peers, stays far from both. A
        patch's score never rises; a defect shared by about `fraction` of the peers or more is
        taken for normal (see `peer_patch_scores`). The calibrations were fitted without peers, so
        on their scale normal images now score lower than they did: a threshold set without peers
        flags fewer images with them (`calibrate --peers` sets thresholds for scoring with them).
        """
        distances = torch.stack([self.bank(layer).patch_scores(p) for layer, p in zip(self.layers, patches)]).mean(dim=0)
        if peers is None:
            return distances
        if peers.shape != distances.shape:
            raise ValueError(f"peer scores of shape {tuple(peers.shape)} do not match the memory's {tuple(distances.shape)}")
        return torch.minimum(distances, peers.to(distances.device, distances.dtype))

    def raw_maps(self, patches: list[Tensor], size: int, peers: Tensor | None = None) -> Tensor:
        """(B, size, size) memory maps from patch features (B, P, D), one per memory layer (and `peers`,
        see `patch_scores`)."""
        return upsample_patch_scores(self.patch_scores(patches, peers), self.grid, size)

    def _stats(self, field: str) -> PositionStats | None:
        """Per-position statistics of one calibration-set map (`prompt_map` or `memory`) on the
        calibration images; None with fewer than POSITION_MIN_IMAGES of them. Recomputed from the
        calibration set, never stored twice."""
        cal = self.calibration_set
        if cal is None or cal.memory.shape[0] < POSITION_MIN_IMAGES:
            return None
        cached = self._position_stats.get(field)
        if cached is None or cached[0] is not cal:
            cached = self._position_stats[field] = (cal, PositionStats.fit(getattr(cal, field)))
        return cached[1]

    @property
    def position_stats(self) -> PositionStats | None:
        """The prompt map's per-position statistics on the calibration images."""
        return self._stats("prompt_map")

    @property
    def memory_position_stats(self) -> PositionStats | None:
        """The memory patch scores' per-position statistics on the calibration images."""
        return self._stats("memory")

    def _normalised_scores(self, stats: PositionStats | None, raw: Tensor, calibration: MapCalibration | None,
                           sigma: float) -> Tensor:
        if stats is None or calibration is None:
            raise ValueError("position-normalised scores need position statistics and their calibration: "
                             "configure the memory (or rebuild it with at least 8 calibration images)")
        z = stats.apply(raw.float().cpu(), self.grid)
        return calibration.apply(top_fraction_mean(torch.from_numpy(smooth_maps(z, sigma)), self.fusion.top_fraction))

    def position_scores(self, prompt_raw: Tensor, sigma: float) -> Tensor:
        """(B,) calibrated image scores of the position-normalised prompt maps (B, S, S)."""
        return self._normalised_scores(self.position_stats, prompt_raw, self.position_calibration, sigma)

    def memory_position_scores(self, memory_raw: Tensor, sigma: float) -> Tensor:
        """(B,) calibrated image scores of the position-normalised raw memory maps (B, S, S)."""
        return self._normalised_scores(self.memory_position_stats, memory_raw, self.memory_position_calibration, sigma)

    def _fit_normalised_calibration(self, field: str, sigma: float) -> MapCalibration | None:
        """The scale of a position-normalised score on the line's normal images (leave-one-out);
        None where the calibration set is too small for position statistics."""
        if self._stats(field) is None:
            return None
        size = int(self.built_with["image_size"])
        scores = leave_one_out_position_scores(getattr(self.calibration_set, field).float(), self.grid, size, sigma,
                                               self.fusion.top_fraction)
        return MapCalibration.fit(scores)

    def fit_position_calibration(self, sigma: float) -> MapCalibration | None:
        return self._fit_normalised_calibration("prompt_map", sigma)

    def fit_memory_position_calibration(self, sigma: float) -> MapCalibration | None:
        return self._fit_normalised_calibration("memory", sigma)

    def fuse(self, memory_raw: Tensor, prompt_scores: Tensor | None, prompt_raw: Tensor | None,
             sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B,), smoothed maps (B, S, S)) of the active mode from the sources' raw maps."""
        mem = self.memory_calibration.apply(memory_raw) if self.memory_calibration else memory_raw
        def memory_position() -> Tensor | None:
            return self.memory_position_scores(memory_raw, sigma) if self.fusion.memory_position > 0 else None

        if self.fusion.mode == "memory":
            maps = smooth_maps(mem, sigma)
            top = top_fraction_mean(torch.from_numpy(maps), self.fusion.top_fraction)
            a = self.fusion.image_evidence
            if a == 0 or self.image_calibration is None:
                return top.numpy(), maps
            scores = _share(self.image_calibration.apply(top), self.fusion.memory_position, memory_position(),
                            "memory position share").numpy().astype(np.float32)
            return scores, ((1 - a) * maps + a * scores[:, None, None]).astype(np.float32)
        if not self.can_fuse:
            raise ValueError("fused scoring needs calibrations of both sources (rebuild the memory)")
        position = self.position_scores(prompt_raw, sigma) if self.fusion.uses_position_term else None
        return fused_outputs(mem, self.prompt_calibration.apply(prompt_raw), self.score_calibration.apply(prompt_scores),
                             self.fusion, self.image_calibration, sigma, position, memory_position())

    def fit_image_calibration(self, sigma: float) -> MapCalibration | None:
        """The image score's scale for the current settings (the local map's top pixels on the
        line's normal images), from the calibration set; None where it cannot be fitted."""
        cal = self.calibration_set
        if cal is None or self.memory_calibration is None:
            return None
        size = int(self.built_with["image_size"])
        local = self.memory_calibration.apply(upsample_patch_scores(cal.memory, self.grid, size))
        v = self.fusion.prompt_map_weight if self.fusion.mode == "fused" else 0.0
        if v > 0:
            if self.prompt_calibration is None:
                return None
            prompt_map = self.prompt_calibration.apply(upsample_patch_scores(cal.prompt_map, self.grid, size))
            local = (1 - v) * local + v * prompt_map
        local = smooth_maps(local, sigma)
        return MapCalibration.fit(top_fraction_mean(torch.from_numpy(local), self.fusion.top_fraction))

    def configure(self, fusion: FusionSettings, sigma: float) -> "LineMemory":
        """Switch mode and weights; the image score's scale is refitted from the calibration set."""
        if fusion.mode == "fused" and not self.can_fuse:
            missing = [name for name, c in (("memory map", self.memory_calibration), ("prompt map", self.prompt_calibration),
                                            ("prompt score", self.score_calibration)) if c is None]
            raise DataError(f"fused mode needs calibrations of both sources, and this memory has none for the "
                            f"{', '.join(missing)}; rebuild it with at least two normal images (memory build)")
        if fusion.mode == "fused" and self.calibration_set is None and self.image_calibration is None \
                and fusion.score_scale() != self.fusion.score_scale():
            raise DataError("this memory was built before fused scores were calibrated per line and cannot refit "
                            "them; rebuild it with anomalyfleet memory build")
        self.fusion = fusion
        if self.calibration_set is not None:
            self.image_calibration = self.fit_image_calibration(sigma)
        self.position_calibration = None
        if fusion.uses_position_term:
            self.position_calibration = self.fit_position_calibration(sigma)
            if self.position_calibration is None or self.image_calibration is None:
                # Too few normal images beyond the memory's to measure each position: the term is
                # off, and the bundle says so.
                self.fusion = replace(self.fusion, position_weight=0.0)
        if fusion.mode == "memory" and fusion.image_evidence > 0 and self.image_calibration is None:
            # No normal image beyond the memory's single one: there is no scale to put the image
            # score on, so the map stays the memory's own (recorded, not silently ignored).
            self.fusion = replace(self.fusion, image_evidence=0.0)
        self.memory_position_calibration = None
        if self.fusion.uses_memory_position:
            if self.image_calibration is not None:
                self.memory_position_calibration = self.fit_memory_position_calibration(sigma)
            if self.memory_position_calibration is None:
                # Too few normal images to measure each position (or no image scale): off, and
                # the bundle says so. Where the share is merely unused (prompts mode, memory
                # mode's raw score) it is kept, as the position weight is, for a later mode.
                self.fusion = replace(self.fusion, memory_position=0.0)
        return self

    # --- persistence: tensors in memory.pt, the rest in detector.json ---------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {f"layer_{layer}": getattr(self, f"bank_{layer}").detach().cpu().clone() for layer in self.layers}
        if self.calibration_set is not None:
            out.update(self.calibration_set.tensors())
        return out

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
                            "prompt_score": cal(self.score_calibration), "fused_score": cal(self.image_calibration),
                            "prompt_position_score": cal(self.position_calibration),
                            "memory_position_score": cal(self.memory_position_calibration)},
            "calibration_images": 0 if self.calibration_set is None else int(self.calibration_set.memory.shape[0]),
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

        memory = cls(
            layers=layers, banks=[tensors[f"layer_{layer}"] for layer in layers], grid=tuple(meta["grid"]),
            shots=int(meta["shots"]), built_with=meta.get("built_with", {}), coreset=meta.get("coreset"),
            fusion=FusionSettings.from_dict(meta.get("fusion", {})), memory_calibration=cal("memory_map"),
            prompt_calibration=cal("prompt_map"), score_calibration=cal("prompt_score"), info=meta.get("info"),
            image_calibration=cal("fused_score"), calibration_set=CalibrationSet.from_tensors(tensors),
            position_calibration=cal("prompt_position_score"),
            memory_position_calibration=cal("memory_position_score"),
        )
        fusion = memory.fusion
        for used, key, field in ((fusion.uses_position_term, "prompt_position_score", "prompt_map"),
                                 (fusion.uses_memory_position, "memory_position_score", "memory")):
            if used and (cal(key) is None or memory._stats(field) is None):
                # Refused on load, not on the first image scored.
                raise ValueError(f"its fusion uses the {key.replace('_', ' ')} but it has no such calibration "
                                 f"or too few calibration images")
        return memory

    def with_mode(self, mode: str) -> "LineMemory":
        """Switch the mode, keeping the weights (`configure` at the smoothing the memory was built with)."""
        return self.configure(replace(self.fusion, mode=mode), float(self.info.get("sigma", 4.0)))


def leave_one_out_coresets(features: Tensor, per_image: int, left_out: int, size: int, seed: int = 0) -> Tensor:
    """(left_out, size) rows of `features` ((n * per_image, D), normalised, image after image): for
    each of the first `left_out` images, the greedy coreset `greedy_coreset` picks (same seed) from
    the other images' rows, all images' searches run together.

    Each step is one (left_out, D) x (D, N) product instead of `left_out` separate searches: about
    2 * left_out * size * N * D flops in all (16 images of 256 patches, a 1024-patch coreset, D 384:
    50 GFLOP, under a second on two cores; with eight views each and the 4096-patch cut of a bank
    with views, 1.6 TFLOP, tens of seconds there). Only memories without held-out calibration
    images need it.
    """
    n_rows = features.shape[0]
    others = n_rows - per_image
    if size >= others:
        raise ValueError(f"a coreset of {size} rows from {others} is all of them; compare with the rows directly")
    # greedy_coreset's first pick, as an index among the other images' rows, mapped back to all rows.
    first = int(torch.randint(others, (1,), generator=torch.Generator().manual_seed(seed)))
    device = features.device
    image = torch.arange(left_out, device=device)
    start = image * per_image
    chosen = torch.empty(left_out, size, dtype=torch.long, device=device)
    chosen[:, 0] = torch.where(first < start, first, first + per_image)
    own = (torch.arange(n_rows, device=device)[None] // per_image) == image[:, None]  # (left_out, N)
    distance = 1.0 - features[chosen[:, 0]] @ features.t()
    distance.masked_fill_(own, float("-inf"))  # a left-out image's own rows are never picked
    for step in range(1, size):
        chosen[:, step] = distance.argmax(dim=1)
        distance = torch.minimum(distance, 1.0 - features[chosen[:, step]] @ features.t())
    return chosen


def leave_one_out_scores(patches: Tensor, limit: int = 32, coreset: int | None = None, seed: int = 0,
                         queries: int | None = None) -> Tensor:
    """(n, P) patch scores of each of the first `limit` images against the other images' patches.

    With `coreset`, each image is compared with what scoring compares a new image with: a greedy
    coreset of that many rows (same seed), here of the *other* images' patches. Against all their
    patches instead, distances would come out lower than scoring's, and the scale with them.
    `queries`: only each image's first that many rows are scored (its own view, when its rows hold
    several views of it: all of them stay out of its comparison); default all, P = the rows.
    """
    normed = F.normalize(patches.float(), dim=-1)
    n, per_image, width = normed.shape
    own = per_image if queries is None else queries
    count = min(limit, n)
    flat = normed.reshape(-1, width)
    if coreset is not None and coreset < (n - 1) * per_image:
        rows = leave_one_out_coresets(flat, per_image, count, coreset, seed)
        scores = [nearest_distance(normed[i, :own], flat[rows[i]]) for i in range(count)]
    else:
        scores = [nearest_distance(normed[i, :own], torch.cat([flat[:i * per_image], flat[(i + 1) * per_image:]]))
                  for i in range(count)]
    return torch.stack(scores)


def leave_one_out_maps(patches: Tensor, grid: tuple[int, int], size: int, limit: int = 32,
                       coreset: int | None = None, seed: int = 0) -> Tensor:
    """(n, size, size) maps of `leave_one_out_scores`, upsampled like every memory map (each image's
    own view: its first grid-size rows)."""
    scores = leave_one_out_scores(patches, limit, coreset, seed, queries=grid[0] * grid[1])
    return upsample_patch_scores(scores, grid, size)


LEAVE_ONE_OUT_LIMIT = 32


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
    prompt_patch_maps: Tensor | None = None,
    sigma: float = 4.0,
    views: int = 1,
) -> LineMemory:
    """A line memory from patch features of normal images (tensors only; see `build_line_memory`).

    shot_patches: per memory layer, (k, V * P, D) features of the k memory images, each image's
    `views` views (`memory_views`) together, its own first (V = 1: (k, P, D)); with views and no
    `coreset`, the bank is cut to `view_bank_limit` rows when it holds more. The memory map's
    scale is calibrated on `calibration_patches` (other normal images of the line) when given,
    else leave-one-out over the memory images (each against the others, coreset-aware), else not
    at all (one image: fine for `memory` mode, refused for `fused`). The prompt map and score
    scales are calibrated on `prompt_raw` / `prompt_scores` of normal images. `prompt_scores` and
    `prompt_patch_maps` ((n, P), the prompt map on the patch grid), when given, are ordered as the
    memory images then the calibration images: with them the calibration images' scores are kept
    (a `CalibrationSet`) and the fused score's scale is fitted at smoothing `sigma`.
    """
    patches_per_view = grid[0] * grid[1]
    for p in shot_patches:
        if p.dim() != 3 or p.shape[1] != views * patches_per_view:
            raise ValueError(f"memory patches of shape {tuple(p.shape)} do not hold {views} view(s) of a "
                             f"{grid[0]}x{grid[1]} patch grid")
    limit = view_bank_limit(shot_patches[0].shape[0], patches_per_view)
    if views > 1 and coreset is None and shot_patches[0].shape[0] * shot_patches[0].shape[1] > limit:
        coreset = limit
    banks = [PatchMemory.build(p, layer, grid, max_size=coreset, seed=seed).features for layer, p in zip(layers, shot_patches)]
    shots, per_image = shot_patches[0].shape[:2]
    built_with = {"image_size": image_size, **built_with}
    memory = LineMemory(layers, banks, grid, shots=int(shots), built_with=built_with, coreset=coreset,
                        fusion=fusion, info=info)
    held = calibration_patches is not None and calibration_patches[0].shape[0] > 0
    if held:
        n = calibration_patches[0].shape[0]
        calibration_scores = torch.cat([memory.patch_scores([p[s:s + 32] for p in calibration_patches])
                                        for s in range(0, n, 32)])
        images = torch.arange(shots, shots + n)
        how = f"{n} held-out normal images"
    elif shots >= 2:
        calibration_scores = torch.stack([leave_one_out_scores(p, LEAVE_ONE_OUT_LIMIT, coreset, seed,
                                                               queries=patches_per_view)
                                          for p in shot_patches]).mean(dim=0)
        images = torch.arange(calibration_scores.shape[0])
        subsampled = coreset is not None and coreset < (shots - 1) * per_image
        against = f"a {coreset}-patch coreset of the others" if subsampled else "all patches of the others"
        if views > 1:
            against += f" ({views} views each)"
        how = f"leave-one-out over {len(images)} memory images, each against {against}"
    else:
        calibration_scores, images, how = None, None, None
    if calibration_scores is not None:
        memory.memory_calibration = MapCalibration.fit(upsample_patch_scores(calibration_scores, grid, image_size))
    if prompt_raw is not None:
        memory.prompt_calibration = MapCalibration.fit(prompt_raw)
    if prompt_scores is not None:
        memory.score_calibration = MapCalibration.fit(prompt_scores)
    memory.info["memory_calibration"] = how
    if calibration_scores is not None and prompt_scores is not None and prompt_patch_maps is not None:
        memory.calibration_set = CalibrationSet(calibration_scores.cpu(), prompt_patch_maps[images].float().cpu(),
                                                prompt_scores[images].float().cpu())
    if fusion.mode == "fused" and not memory.can_fuse:
        raise DataError("fused mode needs at least two normal images (one memory image cannot calibrate "
                         "the memory map's scale); give more normal images or use --mode memory")
    if fusion.mode == "fused" and memory.calibration_set is None:
        raise ValueError("fused mode needs the prompts' scores and patch-grid maps of the normal images "
                         "(prompt_scores, prompt_patch_maps) to calibrate the fused score")
    memory.info["sigma"] = sigma
    return memory.configure(fusion, sigma)


PROMPT_CALIBRATION_MAPS = 64


def default_memory_layers(num_layers: int) -> tuple[int, ...]:
    """The block two thirds of the way up (block 8 of the 12-block ViT-S, block 4 of six).

    Measured on the ViT-S only (benchmarks/memory_blocks.py, three products): the last blocks are
    far worse for nearest-normal-patch distance; for the memory alone and fused, blocks 7-9 beat the
    middle block 6 in image AUROC everywhere and block 8 was best or within 0.3. Batch zero-shot
    mode, which uses the memory's block, gains 3.5 image AUROC on Magnetic Tile there and is within
    0.9 of its best block on cells. Other backbones keep the same relative depth until measured."""
    return (max(1, (2 * num_layers + 1) // 3),)


def prompt_patch_maps(detector, features, text: Tensor) -> Tensor:
    """(B, P) the prompts' anomaly map on the patch grid (before upsampling): upsampled, it is the
    detector's raw prompt map, so a calibration set stays small."""
    from anomalyfleet import maps as mapping

    patches = features.patch_features[: len(detector.settings.layers)]
    grid = features.grid
    layer_maps = mapping.layer_probability_maps(patches, text, grid, grid[0], detector.settings.temperature)
    return mapping.anomaly_map(layer_maps).reshape(patches[0].shape[0], -1)


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
    views: str = DEFAULT_VIEWS,
) -> LineMemory:
    """A line memory for `detector` from the normal (label 0) images among `samples`.

    k normal images (a seeded draw; all of them when k is None or larger) go into the memory, each
    with its `views` (`memory_views`: flips, quarter turns); up to `calibration_images` other
    normal images calibrate the maps' scales (else leave-one-out over the memory images). Features
    come from the detector's frozen backbone at its own settings, batched, on the detector's device.
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
    wanted = detector.layers_with(layers)
    index = [wanted.index(layer) for layer in layers]

    extra_views = len(view_names(views)) - 1
    dataset = AnomalyDataset(chosen + held, image_size=detector.image_size, mean=detector.mean, std=detector.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    patches: list[list[Tensor]] = [[] for _ in layers]
    turned: list[list[Tensor]] = [[] for _ in layers]  # the memory images' other views, batch by batch
    prompt_scores, prompt_raw, prompt_grid = [], [], []
    bar = tqdm(total=len(dataset) + extra_views * k, desc="memory", unit="img", disable=not progress)
    seen = 0
    with torch.inference_mode():
        # The prompt scales are calibrated in every mode, so a bundle's mode can be switched later.
        text = detector.text_features()
        for batch in loader:
            features = detector.extract(batch["image"].to(detector.device), layers=wanted)
            for slot, i in enumerate(index):
                patches[slot].append(features.patch_features[i])
            s, raw = detector.score_features(features, text)
            prompt_scores.append(s)
            prompt_grid.append(prompt_patch_maps(detector, features, text))
            room = PROMPT_CALIBRATION_MAPS - sum(len(r) for r in prompt_raw)
            if room > 0:  # full-size maps: a few dozen images fix the scale
                prompt_raw.append(raw[:room])
            bar.update(batch["image"].shape[0])
            mine = batch["image"][:max(0, k - seen)]  # memory images come first in the dataset
            seen += batch["image"].shape[0]
            if extra_views and len(mine):
                for slot, part in enumerate(other_view_patches(detector, mine.to(detector.device), layers, views)):
                    turned[slot].append(part)
                bar.update(extra_views * len(mine))
    bar.close()
    stacked = [torch.cat(p) for p in patches]
    # Each memory image's rows: its own view, then the others (fit_line_memory's layout).
    shots = [torch.cat([p[:k], torch.cat(t)], dim=1) if extra_views else p[:k] for p, t in zip(stacked, turned)]
    built_with = {"image_size": detector.settings.image_size, "dpam_layers": detector.settings.dpam_layers,
                  "layers": list(map_layers), "backbone_fingerprint": detector.backbone.fingerprint()}
    info = {"images": [s.image for s in chosen], "calibration_images": len(held), "seed": seed, "views": views}
    return fit_line_memory(
        layers, shots, detector.backbone.grid, detector.image_size, built_with, views=extra_views + 1,
        calibration_patches=[p[k:] for p in stacked] if held else None,
        prompt_scores=torch.cat(prompt_scores), prompt_raw=torch.cat(prompt_raw),
        coreset=coreset, fusion=fusion, seed=seed, info=info, prompt_patch_maps=torch.cat(prompt_grid),
        sigma=detector.settings.sigma,
    )
