"""Streaming per-sample, per-layer statistics of a capture file, per condition.

One pass over ``image_attention`` (chunk by chunk, never the whole array in memory) gives,
for every sample and layer, the statistics the paper's analysis needs: overlap of the
head-mean map with the object mask (and per head), entropy and skewness of the head-mean
map, its sum and max. The metric definitions live in :mod:`vislens.metrics`; this module
only streams and assembles them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import metrics
from .errors import VislensError


def nanmean(x: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray | float:
    """``np.nanmean``, quietly NaN where a slice has no finite value (an undefined mean,
    e.g. the overlap when no sample has a box mask, is reported as nan, not warned about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def capture_progress(cap) -> tuple[int, int, int]:
    """``(done, failed, total)`` samples of an open capture; done = done under every condition."""
    n = len(cap)
    done = np.ones(n, dtype=bool)
    for c in cap.conditions:
        done &= np.asarray(cap.done(c), dtype=bool)
    failed = int(np.asarray(cap.samples["failed"], dtype=bool).sum())
    return int(done.sum()), failed, n


def samples_note(cap) -> str:
    """How many samples an analysis of ``cap`` rests on, for headers and notes:
    ``"16 samples"``, ``"16 samples (2 failed)"``, or, for a working file that is still being
    written, ``"8 of 16 samples done (unfinished capture)"``."""
    done, failed, n = capture_progress(cap)
    failed_text = f", {failed} failed" if failed else ""
    if not cap.complete:
        return f"{done} of {n} samples done{failed_text} (unfinished capture)"
    return f"{n} samples ({failed} failed)" if failed else f"{n} samples"


@dataclass
class LayerStats:
    """Per-sample statistics of one condition. Arrays are [n, L] unless noted."""

    condition: str
    rows: np.ndarray  # [n] capture rows (done samples only)
    correct: np.ndarray  # [n] bool
    confidence: np.ndarray  # [n]
    relation: np.ndarray  # [n] str
    image_mass: np.ndarray  # head-mean attention mass on image tokens
    text_mass: np.ndarray
    attn_sum: np.ndarray  # head-mean sum over grid cells (spatial image attention)
    attn_max: np.ndarray  # head-mean max over grid cells
    entropy: np.ndarray
    skewness: np.ndarray
    overlap: np.ndarray | None = None  # head-mean map vs mask
    overlap_heads: np.ndarray | None = None  # [n, L, H]
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.image_mass.shape[1])


def condition_stats(cap, condition: str, *, chunk: int = 32, mask: np.ndarray | None = None
                    ) -> LayerStats:
    """Stream one condition of an open capture into :class:`LayerStats`."""
    tab = cap.table(conditions=[condition])
    if tab.empty:
        raise VislensError(f"{cap.path}: condition {condition!r} has no completed samples")
    by_row = tab.set_index("row") if "row" in tab.columns else None
    mask = cap.box_mask() if mask is None else mask
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("rows", "sum", "max", "ent", "skew", "ov", "ovh")}
    # float32 throughout (see vislens.metrics); the next chunk is read on a background
    # thread while this one is reduced
    for rows, attn in cap.iter_attention(condition, chunk=chunk, prefetch=True, reuse=True):
        head_mean = attn.mean(axis=2)  # [n, L, G, G]
        parts["rows"].append(np.asarray(rows))
        parts["sum"].append(head_mean.sum(axis=(-1, -2), dtype=np.float64))
        parts["max"].append(head_mean.max(axis=(-1, -2)).astype(np.float64))
        parts["ent"].append(metrics.attention_entropy(head_mean))
        parts["skew"].append(metrics.attention_skewness(head_mean))
        if mask is not None:
            m = mask[np.asarray(rows)]
            parts["ov"].append(metrics.overlap(head_mean, m))  # = reduce_heads="mean"
            parts["ovh"].append(metrics.overlap(attn, m))
    rows = np.concatenate(parts["rows"])
    image_mass, text_mass = cap.masses(condition)
    if by_row is not None:
        info = by_row.loc[rows]
    else:
        info = tab.iloc[:len(rows)]
    return LayerStats(
        condition=condition, rows=rows, correct=info["correct"].to_numpy(bool),
        confidence=info["confidence"].to_numpy(float), relation=info["relation"].to_numpy(str),
        image_mass=image_mass[rows].mean(axis=-1), text_mass=text_mass[rows].mean(axis=-1),
        attn_sum=np.concatenate(parts["sum"]), attn_max=np.concatenate(parts["max"]),
        entropy=np.concatenate(parts["ent"]), skewness=np.concatenate(parts["skew"]),
        overlap=np.concatenate(parts["ov"]) if parts["ov"] else None,
        overlap_heads=np.concatenate(parts["ovh"]) if parts["ovh"] else None)


def per_layer_auroc_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``condition, layer, auroc, n_pos, n_neg`` of overlap predicting correctness."""
    frames = []
    for st in stats:
        if st.overlap is None:
            continue
        df = metrics.per_layer_auroc(st.overlap, st.correct)
        df.insert(0, "condition", st.condition)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["condition", "layer", "auroc", "n_pos", "n_neg"])
    return pd.concat(frames, ignore_index=True)


def summary_table(stats: Sequence[LayerStats], layer: int | None = None) -> pd.DataFrame:
    """Per condition: accuracy, confidence and mean attention statistics (one layer or all)."""
    rows = []
    for st in stats:
        sel = slice(None) if layer is None else slice(layer, layer + 1)
        share = st.image_mass[:, sel] / (st.image_mass[:, sel] + st.text_mass[:, sel])
        rows.append({
            "condition": st.condition, "n": len(st.rows),
            "accuracy": float(np.mean(st.correct)), "confidence": float(np.mean(st.confidence)),
            "image_attention_share": float(nanmean(share)),
            "entropy": float(nanmean(st.entropy[:, sel])),
            "skewness": float(nanmean(st.skewness[:, sel])),
            "overlap": float(nanmean(st.overlap[:, sel])) if st.overlap is not None else np.nan,
            "layer_variance": float(np.mean(np.var(st.image_mass, axis=1))),
        })
    return pd.DataFrame(rows)


def calibration_table(stats: Sequence[LayerStats], layer: int) -> pd.DataFrame:
    """AUROC of confidence, attention sum and attention max (at ``layer``) for correctness."""
    frames = []
    for st in stats:
        df = metrics.calibration_aurocs(st.confidence, st.attn_sum[:, layer], st.attn_max[:, layer],
                                        st.correct)
        df.insert(0, "condition", st.condition)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def all_stats(path: str | Path, conditions: Sequence[str] | None = None, *, chunk: int = 32
              ) -> list[LayerStats]:
    """:func:`condition_stats` for every (or the given) condition of a capture file."""
    from .store import open_capture

    with open_capture(path) as cap:
        names = list(conditions) if conditions else list(cap.conditions)
        unknown = [c for c in names if c not in cap.conditions]
        if unknown:
            raise VislensError(f"{path}: no condition {unknown[0]!r} (has {', '.join(cap.conditions)})")
        mask = cap.box_mask()
        return [condition_stats(cap, c, chunk=chunk, mask=mask) for c in names]
