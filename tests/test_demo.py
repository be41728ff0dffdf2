"""`make demo` end to end on a small ELPV subset: every step of the story runs and reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_story(tmp_path):
    pytest.importorskip("elpv_dataset", reason="the demo's data comes from the elpv-dataset package")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # A relative --out, as `make demo` gives it (the serving step once broke on relative paths).
    result = subprocess.run([sys.executable, "-m", "anomalyfleet.demo", "--out", "demo-out", "--limit-per-class", "8",
                             "--overlays", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tmp_path = tmp_path / "demo-out"
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in result.stderr, step
    assert json.loads((tmp_path / "report.json").read_text())["images"] == 16
    # The same 16 cells scored again with a line memory of 4 other normal cells, in its own bundle.
    with_memory = json.loads((tmp_path / "report-line-memory.json").read_text())
    assert with_memory["images"] == 16 and 0.0 <= with_memory["mean"]["image_auroc"] <= 1.0
    scores = [row["score"] for row in with_memory["per_image"]]
    assert len(scores) == 16 and all(math.isfinite(x) for x in scores) and len(set(scores)) > 1
    zero_shot = {row["image"]: row["score"] for row in json.loads((tmp_path / "report.json").read_text())["per_image"]}
    assert {row["image"] for row in with_memory["per_image"]} == set(zero_shot)
    assert [row["score"] for row in with_memory["per_image"]] != [zero_shot[row["image"]] for row in with_memory["per_image"]]
    # One line memory per cell kind, each of that kind's cells only.
    from anomalyfleet.demo import elpv_samples

    kind_of = {s.image: s.category for s in elpv_samples(None)}
    kinds = {row["category"] for row in with_memory["per_image"]}
    assert kinds and set(with_memory["per_category"]) == kinds
    for kind in kinds:
        bundle = json.loads((tmp_path / "detectors" / f"{kind.replace('_', '-')}-line" / "detector.json").read_text())
        assert bundle["memory"]["shots"] == 4 and bundle["memory"]["fusion"]["mode"] == "fused"
        # 12 other normal cells set the scales, enough for both position-normalised scores.
        assert bundle["memory"]["calibration_images"] == 12 and bundle["memory"]["fusion"]["position_weight"] == 0.1
        assert bundle["memory"]["fusion"]["memory_position"] == 1.0
        held = bundle["memory"]["info"]["images"]
        assert not set(held) & set(zero_shot)  # the memory's cells are not scored
        assert {kind_of[image] for image in bundle["memory"]["info"]["data"]} == {kind}  # memory and calibration cells
    summary = [line for line in result.stderr.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1 and "zero-shot" in summary[0] and "with a line memory of 4 normal cells" in summary[0]
    assert "memory alone" in summary[0] and "prompts trained on synthetic defects" in summary[0]
    assert "with peers" in summary[0]
    # ... and with the other cells as peers: the same cells, scores that can only fall.
    with_peers = json.loads((tmp_path / "report-line-memory-peers.json").read_text())
    assert with_peers["images"] == 16 and with_peers["peers"]["group_size"] == 32
    assert len(list((tmp_path / "overlays").rglob("*.png"))) == 4
    manifest = (tmp_path / "library" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 48 and (tmp_path / "library" / "contact-sheet.png").is_file()
    assert (tmp_path / "registry" / "detectors" / "elpv" / "v0001" / "manifest.json").is_file()
    summary = json.loads((tmp_path / "bulk" / "summary.json").read_text())
    assert summary["lines"]["elpv"]["images"] == 16 and summary["lines"]["elpv"]["errors"] == 0
    assert result.stderr.count("POST /v1/lines/elpv/score") == 4
