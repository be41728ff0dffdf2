"""One labelled image: the unit every reader produces and every consumer takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    image: str
    label: int  # 0 normal, 1 anomalous
    mask: str | None  # None: all-normal for a normal image; label-only for an anomalous one
    category: str
    mask_threshold: int = 1  # a mask pixel >= this value is defect

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.label == 0
