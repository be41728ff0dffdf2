"""A torch Dataset over Samples, producing model-ready tensors."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from anomalyfleet.data.samples import Sample
from anomalyfleet.data.transforms import load_image, load_mask, preprocess_image, preprocess_mask
from anomalyfleet.errors import DataError


class AnomalyDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = load_image(sample.image)
        if sample.mask is not None:
            mask = load_mask(sample.mask, sample.mask_threshold)
            if mask.shape != (image.height, image.width):
                raise DataError(
                    f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but image {sample.image} "
                    f"is {image.width}x{image.height}"
                )
            mask_tensor = preprocess_mask(mask, self.image_size)
        else:
            mask_tensor = torch.zeros(1, self.image_size, self.image_size)
        return {
            "image": preprocess_image(image, self.image_size, self.mean, self.std),
            "mask": mask_tensor,
            "has_mask": torch.tensor(sample.has_mask),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "index": index,
            "path": sample.image,
            "category": sample.category,
            "orig_size": torch.tensor([image.height, image.width]),
        }
