"""Streaming per-sample, per-layer statistics of a capture file, per condition.

One pass over ``image_attention`` (chunk by chunk, never the whole array in memory) gives,
for every sample and layer, the statistics the paper's analysis needs: overlap of the
head-mean map with the object mask (and per head), entropy (Eq. 4) and positional skewness
(Eq. 5) of each head's map averaged over heads, the head-mean map's sum and max. The metric definitions live in :mod:`vislens.metrics`; this module
only streams and assembles them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

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
    entropy: np.ndarray  # Eq. 4 of each head's map, averaged over heads
    skewness: np.ndarray  # Eq. 5 (positional) of each head's map, averaged over heads
    overlap: np.ndarray | None = None  # head-mean map vs mask
    overlap_heads: np.ndarray | None = None  # [n, L, H]
    extra: dict = field(default_factory=dict)
    sample_id: np.ndarray | None = None  # [n] str
    split: np.ndarray | None = None  # [n] str: "val" / "test" (as the capture stores it)

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
        parts["ent"].append(_head_average(metrics.attention_entropy(attn)))
        parts["skew"].append(_head_average(metrics.attention_skewness(attn)))
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
        overlap_heads=np.concatenate(parts["ovh"]) if parts["ovh"] else None,
        sample_id=info["id"].to_numpy(str), split=info["split"].to_numpy(str))


def _head_average(per_head: np.ndarray) -> np.ndarray:
    """``[n, L, H] -> [n, L]``: mean over the heads where the value is defined (NaN if none)."""
    ok = np.isfinite(per_head)
    total = np.where(ok, per_head, 0.0).sum(axis=-1)
    count = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def attention_stats_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``condition, sample_id, layer, entropy, skewness``: one row per sample and layer.

    Entropy (Eq. 4, nats) and positional skewness (Eq. 5) of each head's image attention,
    averaged over heads (heads whose value is undefined are left out of the mean).
    """
    frames = []
    for st in stats:
        n, L = st.entropy.shape
        ids = st.sample_id if st.sample_id is not None else st.rows.astype(str)
        frames.append(pd.DataFrame({
            "condition": st.condition, "sample_id": np.repeat(ids, L),
            "layer": np.tile(np.arange(L), n), "entropy": st.entropy.ravel(),
            "skewness": st.skewness.ravel()}))
    if not frames:
        return pd.DataFrame(columns=["condition", "sample_id", "layer", "entropy", "skewness"])
    return pd.concat(frames, ignore_index=True)


class LayerChoice(NamedTuple):
    """A layer chosen on the validation split and its AUROC on the test split."""

    layer: int
    val_auroc: float
    test_auroc: float
    test_low: float
    test_high: float
    n_val: int
    n_test: int


def choose_layer(st: LayerStats, *, n_boot: int = metrics.N_BOOT, seed: int = 0,
                 strata: np.ndarray | None = None) -> LayerChoice | None:
    """The layer whose overlap AUROC is highest on the validation samples, scored on test.

    Ties go to the lower layer. The test AUROC's interval is a bootstrap over the test
    samples with the layer held fixed; ``strata`` (one label per sample of ``st``, e.g. the
    capture file of pooled stats) keeps each stratum's test count in every resample. Samples
    whose overlap is undefined at the chosen layer (no box: an all-zero mask) count in
    neither the AUROCs, the interval, ``n_val`` nor ``n_test``. None when the stats have no
    overlap, no split, or either split lacks a class (then no honest choice exists).
    """
    if st.overlap is None or st.split is None:
        return None
    val, test = st.split == "val", st.split == "test"
    if not val.any() or not test.any():
        return None
    v = metrics.per_layer_auroc(st.overlap[val], st.correct[val])
    if not np.isfinite(v["auroc"]).any():
        return None
    best = v[np.isfinite(v["auroc"])].sort_values(["auroc", "layer"], ascending=[False, True]).iloc[0]
    layer = int(best["layer"])
    defined = np.isfinite(st.overlap[:, layer])
    test = test & defined
    t = metrics.auroc(st.overlap[test, layer], st.correct[test])
    if not np.isfinite(t.auroc):
        return None
    lo, hi = metrics.auroc_interval(st.overlap[test, layer], st.correct[test], n_boot=n_boot, seed=seed,
                                    strata=None if strata is None else np.asarray(strata)[test])
    return LayerChoice(layer, float(best["auroc"]), t.auroc, lo, hi, int((val & defined).sum()),
                       int(test.sum()))


def per_layer_auroc_table(stats: Sequence[LayerStats], n_boot: int = 0) -> pd.DataFrame:
    """``condition, layer, auroc, n_pos, n_neg`` of overlap predicting correctness.

    With ``n_boot > 0`` also ``auroc_low, auroc_high``, the 95% bootstrap interval.
    """
    frames = []
    for st in stats:
        if st.overlap is None:
            continue
        df = metrics.per_layer_auroc(st.overlap, st.correct, n_boot=n_boot)
        df.insert(0, "condition", st.condition)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["condition", "layer", "auroc", "n_pos", "n_neg"]
                            + (["auroc_low", "auroc_high"] if n_boot else []))
    return pd.concat(frames, ignore_index=True)


#: the layers the paper draws for its 32-layer models (0-based), by figure
PAPER_LAYERS: dict[int, tuple[int, ...]] = {5: (17,), 6: (17, 18), 9: (17,), 10: (17,),
                                            14: (17,), 18: (17,), 26: (14,)}


def paper_layer(layer32: int, num_layers: int) -> int:
    """A paper layer of a 32-layer model at the same relative depth of a ``num_layers`` model.

    ``round(layer32 * num_layers / 32)``, kept in range; the paper's own layer when
    ``num_layers == 32``.
    """
    if num_layers < 1:
        raise VislensError(f"num_layers must be >= 1, got {num_layers}")
    return int(min(num_layers - 1, max(0, round(layer32 * num_layers / 32))))


def summary_table(stats: Sequence[LayerStats], layer: int | None = None) -> pd.DataFrame:
    """Per condition: accuracy (with its Wilson 95% interval), confidence and mean attention
    statistics (one layer or all)."""
    rows = []
    for st in stats:
        sel = slice(None) if layer is None else slice(layer, layer + 1)
        share = st.image_mass[:, sel] / (st.image_mass[:, sel] + st.text_mass[:, sel])
        lo, hi = metrics.wilson_interval(int(np.sum(st.correct)), len(st.rows))
        rows.append({
            "condition": st.condition, "n": len(st.rows),
            "accuracy": float(np.mean(st.correct)), "accuracy_low": lo, "accuracy_high": hi,
            "confidence": float(np.mean(st.confidence)),
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
