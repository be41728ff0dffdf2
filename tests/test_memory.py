"""Line memory: nearest-patch search, coreset, mutual batch scoring, calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalyfleet.memory import (MapCalibration, PatchMemory, greedy_coreset, mutual_patch_scores, nearest_distance,
                                 top_fraction_mean)


def test_chunked_search_equals_brute_force():
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(1000, 16), dim=-1)
    memory = F.normalize(torch.randn(300, 16), dim=-1)
    brute = torch.tensor([min(1 - float(q @ m) for m in memory) for q in queries[:50]])
    fast = nearest_distance(queries, memory, chunk=7)
    torch.testing.assert_close(fast[:50], brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, nearest_distance(queries, memory, chunk=4096))


def test_memory_scores_zero_on_its_own_patches_and_round_trips():
    torch.manual_seed(1)
    patches = torch.randn(2, 9, 8)
    memory = PatchMemory.build(patches, layer=6, grid=(3, 3))
    assert memory.patch_scores(patches).abs().max() < 1e-5
    restored = PatchMemory.from_state_dict(memory.state_dict())
    other = torch.randn(1, 9, 8)
    torch.testing.assert_close(restored.patch_scores(other), memory.patch_scores(other))


def test_coreset_covers_the_data():
    torch.manual_seed(2)
    centres = F.normalize(torch.randn(5, 8), dim=-1)
    data = F.normalize(centres.repeat_interleave(40, 0) + 0.01 * torch.randn(200, 8), dim=-1)
    chosen = greedy_coreset(data, 5)
    # Farthest-point sampling picks one point near each of the five clusters.
    assert len({int(i) // 40 for i in chosen}) == 5


def test_mutual_scoring_is_robust_to_a_few_defective_images():
    """Images rank the same with or without two strongly defective images in the batch."""
    torch.manual_seed(3)
    texture = torch.randn(16, 8)
    direction = F.normalize(torch.randn(8), dim=0)

    def image(level: float) -> torch.Tensor:
        x = texture + 0.01 * torch.randn(16, 8)
        x[5] = x[5] + level * direction  # graded deviation of one patch
        return x

    graded = [image(level) for level in (1.5, 1.0, 0.5)] + [image(0.0) for _ in range(9)]
    defective = [image(0.0) for _ in range(2)]
    for x in defective:
        x[3] = torch.randn(8) * 3  # a strong, unrelated defect
    clean = mutual_patch_scores(torch.stack(graded))
    mixed = mutual_patch_scores(torch.stack(graded + defective))
    # The three deviating images rank first, in order of deviation, with or without the defects.
    assert torch.equal(clean[:, 5].argsort(descending=True)[:3], torch.arange(3))
    assert torch.equal(mixed[:12, 5].argsort(descending=True)[:3], torch.arange(3))
    assert mixed[12:, 3].min() > mixed[:12, 3].max()


def test_calibration_and_top_fraction():
    maps = torch.arange(100.0).reshape(1, 10, 10)
    calibration = MapCalibration.fit(maps, quantile=0.99)
    scaled = calibration.apply(maps)
    assert abs(float(scaled.flatten().median())) < 1e-6
    assert MapCalibration.from_dict(calibration.to_dict()) == calibration
    assert float(top_fraction_mean(maps, 0.02)[0]) == 98.5
