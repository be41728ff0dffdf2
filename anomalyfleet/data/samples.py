"""One labelled image: the unit every reader produces and every consumer takes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from anomalyfleet.errors import DataError


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


def _stat_entry(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return [path, info.st_size, info.st_mtime_ns]


def files_fingerprint(samples: Sequence[Sample]) -> str:
    """Digest of the sample list and its files' sizes and modification times.

    Stat data rather than content hashes: checking a large set must cost seconds, not a full read;
    a rewritten file (an image, or a mask corrected in place) changes its mtime.
    """
    payload = [
        [_stat_entry(s.image), s.label, _stat_entry(s.mask), s.mask_threshold, s.category] for s in samples
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]
