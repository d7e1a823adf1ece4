"""Calibration/evaluation splits.

AdaptVis tunes its thresholds on a 20 % sample and the paper reports on it; vislens tunes on
``val`` and reports on the held-out ``test``. :func:`assign_splits` is deterministic in the
seed and the sample ids only (not the input order); a split the dataset itself names for a
sample (``Sample.given_split``, the JSONL ``split`` field) is kept. :func:`paper_sample_indices`
recreates the paper code's 20 % index sample for comparison.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from typing import Iterable, Literal, Sequence

from ..errors import VislensError
from .base import Sample

__all__ = ["SPLITS", "SAMPLE_SPLITS", "assign_splits", "select_split", "paper_sample_indices"]

SPLITS = ("val", "test", "all")
#: The splits one sample can be in (``"all"`` only selects).
SAMPLE_SPLITS = ("val", "test")


def _rank_key(seed: int, unit: str) -> tuple[bytes, str]:
    digest = hashlib.sha256(f"{seed}\x00{unit}".encode("utf-8")).digest()
    return digest, unit


def _unit(sample: Sample, keep_groups: bool) -> str:
    return f"group:{sample.group}" if keep_groups and sample.group else f"id:{sample.id}"


def assign_splits(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0, *, keep_groups: bool = True
) -> None:
    """Set ``sample.split`` to ``"val"`` or ``"test"`` in place.

    A sample whose dataset names its split (``given_split``) keeps it. The others, the free
    ones, are split by hash: units (a sample, or with ``keep_groups`` all samples sharing a
    non-empty ``group``) are ranked by ``sha256(seed, unit)`` and taken into ``val`` until it
    holds ``floor(val_fraction * n_free)`` samples. Keeping groups whole means Controlled A/B
    pair and set accuracy are computed from complete groups (whole groups can overshoot the
    target by less than one group); with ``keep_groups`` a free sample in a group whose other
    samples name one split joins it. Ids must be unique, since they define the ranking.
    """
    if not 0.0 <= val_fraction <= 1.0 or math.isnan(val_fraction):
        raise VislensError(f"val_fraction must be in [0, 1], got {val_fraction}")
    duplicates = [i for i, c in Counter(s.id for s in samples).items() if c > 1]
    if duplicates:
        raise VislensError(f"sample ids must be unique to assign splits; duplicated: {duplicates[0]!r}")
    named = [s for s in samples if s.given_split]
    for sample in named:
        if sample.given_split not in SAMPLE_SPLITS:
            raise VislensError(f"sample {sample.id!r}: split {sample.given_split!r} is not one of "
                               f"{', '.join(SAMPLE_SPLITS)}")
    group_split: dict[str, set[str]] = {}
    if keep_groups:
        for sample in named:
            if sample.group:
                group_split.setdefault(sample.group, set()).add(sample.given_split)
    free = [s for s in samples if not s.given_split and not group_split.get(s.group)]
    sizes = Counter(_unit(s, keep_groups) for s in free)
    target = math.floor(val_fraction * len(free) + 1e-9)
    val_units: set[str] = set()
    taken = 0
    for unit in sorted(sizes, key=lambda u: _rank_key(seed, u)):
        if taken >= target:
            break
        val_units.add(unit)
        taken += sizes[unit]
    for sample in samples:
        if sample.given_split:
            sample.split = sample.given_split
        elif sample.group in group_split:  # only filled with keep_groups
            names = group_split[sample.group]
            if len(names) > 1:
                raise VislensError(f"sample {sample.id!r} names no split, but its group "
                                   f"{sample.group!r} has samples in both val and test; give it "
                                   "a split field too")
            sample.split = next(iter(names))
        else:
            sample.split = "val" if _unit(sample, keep_groups) in val_units else "test"


def select_split(samples: Iterable[Sample], split: Literal["val", "test", "all"]) -> list[Sample]:
    """The samples of one split (``"all"`` = every sample), in input order.

    Asking for ``val``/``test`` when a sample has no split yet is an error rather than an
    empty result, so a forgotten :func:`assign_splits` cannot pass silently.
    """
    if split not in SPLITS:
        raise VislensError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    samples = list(samples)
    if split == "all":
        return samples
    unassigned = [s.id for s in samples if not s.split]
    if unassigned:
        raise VislensError(f"sample {unassigned[0]!r} has no split; call assign_splits first")
    return [s for s in samples if s.split == split]


def paper_sample_indices(n: int, seed: int = 1) -> list[int]:
    """The AdaptVis 20 % sample: ``random.seed(1); sorted(random.sample(range(n), int(0.2*n)))``.

    Uses a private ``random.Random(seed)`` (same sequence, global state untouched). This
    assumes nothing else drew from Python's ``random`` before ``main_aro.py`` sampled; it is
    unverified against the paper's ``sampled_idx_*.npy`` files, which were not published.
    """
    if n < 0:
        raise VislensError(f"n must be >= 0, got {n}")
    return sorted(random.Random(seed).sample(range(n), int(0.2 * n)))
