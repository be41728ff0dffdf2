"""`make demo` end to end on a small ELPV subset: every step of the story runs and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_story(tmp_path):
    pytest.importorskip("elpv_dataset", reason="the demo's data comes from the elpv-dataset package")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "anomalyfleet.demo", "--out", str(tmp_path), "--limit-per-class", "8",
                             "--overlays", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in result.stderr, step
    assert json.loads((tmp_path / "report.json").read_text())["images"] == 16
    assert len(list((tmp_path / "overlays").rglob("*.png"))) == 4
    manifest = (tmp_path / "library" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 48 and (tmp_path / "library" / "contact-sheet.png").is_file()
    assert (tmp_path / "registry" / "detectors" / "elpv" / "v0001" / "manifest.json").is_file()
    summary = json.loads((tmp_path / "bulk" / "summary.json").read_text())
    assert summary["lines"]["elpv"]["images"] == 16 and summary["lines"]["elpv"]["errors"] == 0
    assert result.stderr.count("POST /v1/lines/elpv/score") == 4
