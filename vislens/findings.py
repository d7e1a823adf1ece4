"""``vislens findings``: test the paper's claims F1-F10 on the user's capture files.

Each finding is one statistic with a 95% bootstrap interval over samples (paired where
conditions are compared: the same resampled samples for both) and a verdict:

- ``reproduced``      the interval lies on the claim's side of the null value;
- ``not reproduced``  it does not (the data do not show the claimed effect, or show the
  opposite);
- ``not testable``    the captures lack what the statistic needs (a condition, boxes, a
  split, token counts, enough samples); ``why`` names it.

Several capture files are pooled: per-sample values from every file that can contribute
are concatenated and resampled within each file (stratified bootstrap); a choice made on
validation samples (a layer, a condition's parameters) is made per pool (F3, F4) or per
file (F9, F10). Definitions, with the paper section each comes from, are in
``docs/findings.md``; the numbers they use are the capture's own (``correct``,
``confidence``, attention masses, the streamed baseline attention statistics of
:mod:`vislens.analysis`).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import metrics
from .errors import VislensError

__all__ = ["Finding", "FINDINGS", "Evidence", "load_evidence", "run_findings", "write_findings",
           "confidence_half_gains", "halves_markdown", "scaling_headroom", "headroom_markdown"]

VERDICTS = ("reproduced", "not reproduced", "not testable")
#: fewer samples than this and a finding is not testable
MIN_SAMPLES = 10
#: relations the paper calls familiar (frequent in LLaVA's training data) and rare (Fig. 15)
FAMILIAR = frozenset({"left", "right"})
RARE = frozenset({"on", "above", "top", "under", "below", "bottom"})
#: relations in F4 need at least this many correct and this many wrong test answers
MIN_PER_CLASS = 5


@dataclass
class Finding:
    """One row of the scorecard (the fields of ``findings.json``)."""

    id: str
    claim: str
    statistic: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    why: str


@dataclass
class Evidence:
    """What the findings read from one capture file (the baseline streamed once)."""

    path: Path
    table: pd.DataFrame  # Capture.table(): one row per (sample, done condition)
    attrs: dict[str, dict[str, Any]]  # condition -> its attrs (method, alpha, ...)
    order: list[str]  # conditions in file order
    baseline: str | None
    num_layers: int
    samples: pd.DataFrame  # Capture.samples
    masses: tuple[np.ndarray, np.ndarray] | None  # baseline (image, text) [N, L, H]
    stats: Any | None  # analysis.LayerStats of the baseline, or None

    def correct(self, condition: str) -> pd.Series:
        """``correct`` of ``condition`` indexed by capture row (done rows only)."""
        t = self.table[self.table["condition"] == condition]
        return t.set_index("row")["correct"].astype(bool)

    def methods(self, method: str) -> list[str]:
        return [c for c in self.order if self.attrs[c].get("method") == method]


def load_evidence(path: str | Path, *, chunk: int = 32) -> Evidence:
    """Read one capture: its results table, condition attrs and the baseline's statistics."""
    from .analysis import condition_stats
    from .plots import baseline_condition
    from .store import open_capture

    with open_capture(path) as cap:
        table = cap.table()
        attrs = {c: cap.condition_attrs(c) for c in cap.conditions}
        try:
            base: str | None = baseline_condition(cap)
        except VislensError:
            base = None
        if base is not None and not cap.done(base).any():
            base = None
        stats = condition_stats(cap, base, chunk=chunk) if base is not None else None
        masses = cap.masses(base) if base is not None else None
        return Evidence(Path(path), table, attrs, list(cap.conditions), base,
                        int(cap.attrs["num_layers"]), cap.samples, masses, stats)


# ----------------------------------------------------------------------------- helpers


class _Untestable(Exception):
    """Raised inside a finding: the captures lack what it needs (the message says what)."""


def _relation_word(rel: str) -> str:
    words = re.findall(r"[^\W\d_]+", str(rel).lower())
    return words[0] if words else ""


def _thirds(num_layers: int) -> tuple[slice, slice]:
    """Early (first third) and middle (second third) layers."""
    a, b = num_layers // 3, (2 * num_layers) // 3
    if a < 1 or b <= a:
        raise _Untestable(f"{num_layers} layers are too few to split into thirds")
    return slice(0, a), slice(a, b)


class _Ctx:
    """Bootstrap settings shared by the findings."""

    def __init__(self, n_boot: int, seed: int, level: float) -> None:
        self.n_boot, self.seed, self.level = n_boot, seed, level

    def interval(self, stat: Callable[[np.ndarray], np.ndarray], n: int,
                 strata: np.ndarray | None) -> tuple[float, float]:
        """Percentile interval of ``stat(idx)`` (``[B]`` values for ``[B, n]`` row indices)."""
        idx = metrics.bootstrap_indices(n, self.n_boot, self.seed, strata)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            reps = stat(idx)
        return metrics.percentile_interval(reps, self.level)


def _layer_range(sl: slice) -> str:
    return f"layer {sl.start}" if sl.stop - sl.start == 1 else f"layers {sl.start}-{sl.stop - 1}"


def _need_n(n: int, what: str) -> None:
    if n < MIN_SAMPLES:
        raise _Untestable(f"only {n} {what} (need at least {MIN_SAMPLES})")


def _col_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``[B, K]`` NaN-ignoring column means of ``values[n, K]`` over each resample's rows."""
    v = values[idx]  # [B, n, K]
    ok = np.isfinite(v)
    return np.where(ok, v, 0.0).sum(axis=1) / ok.sum(axis=1)


def _nanmean_cols(values: np.ndarray) -> np.ndarray:
    """Column means leaving NaN out; NaN (no warning) for a column without values."""
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values, 0.0).sum(axis=0) / ok.sum(axis=0)


def _extreme_mean(D: np.ndarray, pick: Callable, strata: np.ndarray, ctx: "_Ctx"
                  ) -> tuple[np.ndarray, float, float, float]:
    """Column means of ``D`` (x100, pp), ``pick`` (nanmax/nanmin) of them, and its interval
    with the pick taken inside every replicate (so choosing the extreme is resampled too)."""
    means = 100 * _nanmean_cols(D)
    lo, hi = ctx.interval(lambda idx: 100 * pick(_col_means(D, idx), axis=1), D.shape[0], strata)
    return means, float(pick(means)), lo, hi


def _verdict(value: float, lo: float, hi: float, *, above: float | None = None,
             below: float | None = None, not_above: float | None = None) -> tuple[str, str]:
    """Verdict from the interval: reproduced when it lies above ``above`` / below ``below``;
    for a claim of *no* improvement, reproduced unless it lies above ``not_above``."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not testable", ("the bootstrap interval is undefined (too many resamples with "
                                "one class of answers or no samples)")
    ci = f"95% interval [{lo:.3f}, {hi:.3f}]"
    if above is not None:
        return ("reproduced", f"{ci} lies above {above:g}") if lo > above else \
            ("not reproduced", f"{ci} does not lie above {above:g}")
    if below is not None:
        return ("reproduced", f"{ci} lies below {below:g}") if hi < below else \
            ("not reproduced", f"{ci} does not lie below {below:g}")
    assert not_above is not None
    return ("not reproduced", f"{ci} lies above {not_above:g}: a significant improvement") \
        if lo > not_above else ("reproduced", f"{ci} does not lie above {not_above:g}: no "
                                             "significant improvement")


def _strata(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])


def _best_on_val(ev: Evidence, conds: Sequence[str]) -> tuple[str, float]:
    """The condition with the highest validation accuracy (ties: first in file order)."""
    best, best_acc = None, -1.0
    for c in conds:
        t = ev.table[(ev.table["condition"] == c) & (ev.table["split"] == "val")]
        if len(t) == 0:
            continue
        acc = float(t["correct"].mean())
        if acc > best_acc:
            best, best_acc = c, acc
    if best is None:
        raise _Untestable(f"{ev.path.name}: no validation samples done under "
                          f"{', '.join(conds)}")
    return best, best_acc


def _paired_test(ev: Evidence, a: str, b: str) -> np.ndarray:
    """Per test sample done in both: correct[a] - correct[b] (in {-1, 0, 1})."""
    return _paired_test_rows(ev, a, b).to_numpy()


def _paired_test_rows(ev: Evidence, a: str, b: str) -> pd.Series:
    """:func:`_paired_test` indexed by capture row."""
    test_rows = set(ev.table.loc[ev.table["split"] == "test", "row"])
    ca, cb = ev.correct(a), ev.correct(b)
    rows = sorted(set(ca.index) & set(cb.index) & test_rows)
    return ca.loc[rows].astype(float) - cb.loc[rows].astype(float)


def _need_split(ev: Evidence) -> None:
    have = set(ev.samples["split"])
    missing = [name for s, name in (("val", "validation"), ("test", "test")) if s not in have]
    if missing:
        raise _Untestable(f"{ev.path.name} has no {' or '.join(missing)} samples (the capture "
                          "stores each sample's split; capture with --split all)")


# ----------------------------------------------------------------------------- F1-F10


#: what every finding function returns: value, ci_low, ci_high, n, why, verdict
_Result = tuple


def f1_attention_share(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    parts, used = [], []
    for ev in evs:
        if ev.baseline is None or ev.masses is None:
            continue
        smp = ev.samples
        n_img = smp["n_image_tokens"].to_numpy(float)
        n_txt = smp["n_text_tokens"].to_numpy(float)
        if not (n_img > 0).any():
            continue
        _, mid = _thirds(ev.num_layers)
        img, txt = ev.masses
        share = metrics.attention_share(img[:, mid], txt[:, mid], n_img, n_txt)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ratio = np.nanmean(share.attention_share, axis=(1, 2)) / share.token_share[:, 0, 0]
        done = ev.correct(ev.baseline).index.to_numpy()
        r = ratio[done]
        parts.append(r[np.isfinite(r) & (n_img[done] > 0)])
        used.append(ev.path.name)
    if not parts:
        raise _Untestable("no baseline condition with image/text token counts stored "
                          "(samples/n_image_tokens)")
    x = np.concatenate(parts)
    _need_n(x.size, "baseline samples with token counts")
    lo, hi = ctx.interval(lambda idx: x[idx].mean(axis=1), x.size, _strata(parts))
    v, why = _verdict(float(x.mean()), lo, hi, below=1.0)
    return float(x.mean()), lo, hi, x.size, why, v


def _add_matrix(evs: Sequence[Evidence]) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """Per sample done under the baseline and at least one positive-delta ``add`` spec:
    correct[add] - correct[base] (NaN where that spec is not done)."""
    specs: list[str] = []
    per: list[dict[str, np.ndarray]] = []
    for ev in evs:
        cols: dict[str, np.ndarray] = {}
        if ev.baseline is not None:
            base = ev.correct(ev.baseline)
            for c in ev.methods("add"):
                if float(ev.attrs[c].get("delta", 0)) <= 0:
                    continue
                key = str(ev.attrs[c].get("spec", c))
                d = ev.correct(c).reindex(base.index).astype(float) - base.astype(float)
                cols[key] = d.to_numpy()
                if key not in specs:
                    specs.append(key)
        per.append(cols if cols else {})
    parts = []
    for ev, cols in zip(evs, per):
        if not cols:
            continue
        n = len(next(iter(cols.values())))
        part = np.stack([cols.get(k, np.full(n, np.nan)) for k in specs], axis=1)
        parts.append(part[np.isfinite(part).any(axis=1)])  # a pair needs both done
    return (np.concatenate(parts) if parts else np.empty((0, 0))), specs, parts


def f2_add_constant(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    D, specs, parts = _add_matrix(evs)
    if not specs:
        raise _Untestable("no baseline and 'add' condition with delta > 0 (capture with "
                          "--condition baseline --condition add:delta=1)")
    _need_n(D.shape[0], "samples done under the baseline and an add condition")
    means, value, lo, hi = _extreme_mean(D, np.nanmax, _strata(parts), ctx)
    v, why = _verdict(value, lo, hi, not_above=0.0)
    best = specs[int(np.nanargmax(means))]
    return value, lo, hi, D.shape[0], f"largest change under {best} (of {', '.join(specs)}); {why}", v


def _pooled_stats(evs: Sequence[Evidence], need_mask: bool = True):
    from .analysis import LayerStats

    use = [ev for ev in evs if ev.stats is not None and (ev.stats.overlap is not None or not need_mask)]
    if not use:
        raise _Untestable("no capture with a baseline condition and an object box mask "
                          "(run vislens boxes FILE)" if need_mask else "no baseline condition")
    layers = {ev.num_layers for ev in use}
    if len(layers) > 1:
        raise _Untestable(f"the captures differ in their number of layers ({sorted(layers)}); "
                          "pool captures of one model")
    sts = [ev.stats for ev in use]
    if len(sts) == 1:
        return sts[0], [ev.path.name for ev in use], [np.arange(len(sts[0].rows))]

    def cat(name):
        vals = [getattr(s, name) for s in sts]
        return None if any(v is None for v in vals) else np.concatenate(vals)

    pooled = LayerStats(
        "baseline", cat("rows"), cat("correct"), cat("confidence"), cat("relation"),
        cat("image_mass"), cat("text_mass"), cat("attn_sum"), cat("attn_max"), cat("entropy"),
        cat("skewness"), overlap=cat("overlap"), sample_id=cat("sample_id"), split=cat("split"))
    return pooled, [ev.path.name for ev in use], [np.arange(len(s.rows)) for s in sts]


def f3_overlap_auroc(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    from .analysis import choose_layer

    st, names, parts = _pooled_stats(evs)
    val, test = st.split == "val", st.split == "test"
    if not val.any() or not test.any():
        raise _Untestable("no " + ("validation" if not val.any() else "test") + " samples (the "
                          "layer is chosen on the validation split; capture with --split all)")
    # resampling keeps each capture file's test count, as every other finding's does
    choice = choose_layer(st, n_boot=ctx.n_boot, seed=ctx.seed,
                          strata=_strata(parts) if len(parts) > 1 else None)
    if choice is None:
        raise _Untestable("the overlap AUROC is undefined on the validation or test split "
                          "(one class of answers)")
    _need_n(choice.n_test, "test samples")
    v, why = _verdict(choice.test_auroc, choice.test_low, choice.test_high, above=0.5)
    return (choice.test_auroc, choice.test_low, choice.test_high, choice.n_test,
            f"layer {choice.layer} chosen on {choice.n_val} validation samples (AUROC "
            f"{choice.val_auroc:.3f}); {why}", v)


def f4_within_relation(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    from .analysis import choose_layer

    st, names, parts = _pooled_stats(evs)
    choice = choose_layer(st, n_boot=1, seed=ctx.seed)
    if choice is None:
        raise _Untestable("no validation-chosen layer (needs validation and test samples with "
                          "both classes and a box mask)")
    test = (st.split == "test") & np.isfinite(st.overlap[:, choice.layer])
    s = st.overlap[test, choice.layer]
    y = np.asarray(st.correct[test], bool)
    rel = np.array([_relation_word(r) for r in st.relation[test]])
    files = _strata(parts)[test]
    keep, skipped = [], []
    for r in pd.unique(rel):
        m = rel == r
        if min(y[m].sum(), (~y[m]).sum()) >= MIN_PER_CLASS:
            keep.append(r)
        else:
            skipped.append(r)
    if not keep:
        raise _Untestable(f"no relation with at least {MIN_PER_CLASS} correct and "
                          f"{MIN_PER_CLASS} wrong test answers")
    members = [np.flatnonzero(rel == r) for r in keep]
    value = float(np.mean([metrics.auroc(s[m], y[m]).auroc for m in members]))
    sel = np.flatnonzero(np.isin(rel, keep))
    # each resample keeps every capture file's count of every relation
    strata = np.char.add(files[sel].astype(str), np.char.add(":", rel[sel]))
    s2, y2 = s[sel], y[sel]
    local = [np.flatnonzero(rel[sel] == r) for r in keep]

    def stat(idx):
        counts = metrics.resample_counts(idx, sel.size)
        return np.mean([metrics.weighted_auroc(s2[m], y2[m], counts[:, m]) for m in local], axis=0)

    lo, hi = ctx.interval(stat, sel.size, strata)
    v, why = _verdict(value, lo, hi, above=0.5)
    note = f"; left out (fewer than {MIN_PER_CLASS} of a class): {', '.join(skipped)}" if skipped else ""
    return (value, lo, hi, int(sel.size),
            f"mean over {', '.join(keep)} at layer {choice.layer}{note}; {why}", v)


def f5_entropy_by_depth(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    st, names, parts = _pooled_stats(evs, need_mask=False)
    early, mid = _thirds(st.num_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmean(st.entropy[:, early], axis=1) - np.nanmean(st.entropy[:, mid], axis=1)
    ok = np.isfinite(d)
    strata = _strata(parts)[ok]
    d = d[ok]
    _need_n(d.size, "baseline samples with defined entropy")
    lo, hi = ctx.interval(lambda idx: d[idx].mean(axis=1), d.size, strata)
    v, why = _verdict(float(d.mean()), lo, hi, above=0.0)
    return (float(d.mean()), lo, hi, d.size,
            f"early {_layer_range(early)} vs middle {_layer_range(mid)}; {why}", v)


def f6_familiar_confidence(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    conf, group, strata = [], [], []
    for k, ev in enumerate(evs):
        if ev.baseline is None:
            continue
        t = ev.table[ev.table["condition"] == ev.baseline]
        words = t["relation"].map(_relation_word)
        fam = words.isin(FAMILIAR).to_numpy()
        rare = words.isin(RARE).to_numpy()
        keep = fam | rare
        conf.append(t["confidence"].to_numpy(float)[keep])
        group.append(np.where(fam[keep], 1, 0))
        strata.append(np.char.add(f"{k}:", group[-1].astype(str)))
    if not conf:
        raise _Untestable("no baseline condition")
    c, g, st = np.concatenate(conf), np.concatenate(group), np.concatenate(strata)
    if not (g == 1).any() or not (g == 0).any():
        missing = "left/right" if not (g == 1).any() else "on/above/top/under/below/bottom"
        raise _Untestable(f"no baseline samples with a {missing} gold relation")
    _need_n(c.size, "baseline samples with a familiar or rare relation")
    fam, rare = g == 1, g == 0
    value = 100 * float(c[fam].mean() - c[rare].mean())

    def stat(idx):
        w = metrics.resample_counts(idx, c.size)
        return 100 * ((w[:, fam] @ c[fam]) / w[:, fam].sum(1) - (w[:, rare] @ c[rare]) / w[:, rare].sum(1))

    lo, hi = ctx.interval(stat, c.size, st)
    v, why = _verdict(value, lo, hi, above=0.0)
    return (value, lo, hi, c.size, f"{int(fam.sum())} familiar vs {int(rare.sum())} rare "
            f"samples; {why}", v)


def f7_confidence_auroc(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    conf, corr = [], []
    for ev in evs:
        if ev.baseline is None:
            continue
        t = ev.table[ev.table["condition"] == ev.baseline]
        conf.append(t["confidence"].to_numpy(float))
        corr.append(t["correct"].to_numpy(bool))
    if not conf:
        raise _Untestable("no baseline condition")
    c, y = np.concatenate(conf), np.concatenate(corr)
    _need_n(c.size, "baseline samples")
    value = metrics.auroc(c, y).auroc
    if not np.isfinite(value):
        raise _Untestable("all baseline answers are " + ("correct" if y.all() else "wrong"))
    lo, hi = ctx.interval(lambda idx: metrics.weighted_auroc(c, y, metrics.resample_counts(idx, c.size)),
                          c.size, _strata(conf))
    v, why = _verdict(value, lo, hi, above=0.5)
    return value, lo, hi, c.size, why, v


def _extreme_scaling(ev: Evidence, smooth: bool) -> str | None:
    cands = [(float(ev.attrs[c]["alpha"]), c) for c in ev.methods("scaling")
             if (float(ev.attrs[c]["alpha"]) < 1) == smooth and float(ev.attrs[c]["alpha"]) != 1]
    whole = [x for x in cands if ev.attrs[x[1]].get("layers") is None] or cands
    if not whole:
        return None
    return (min(whole) if smooth else max(whole))[1]


def _halves(ev: Evidence, conditions: Sequence[str]) -> tuple[pd.Index, np.ndarray, pd.Series]:
    """Rows done under the baseline and every one of ``conditions``, which of them are in the
    low-confidence half, and the baseline's ``correct`` on those rows (F8's split, shared by
    :func:`confidence_half_gains`). The halves are one split of the capture: baseline
    confidence below its median over *all* the baseline's samples, whichever conditions
    are asked for, so every condition's cells are on the same halves."""
    t = ev.table[ev.table["condition"] == ev.baseline].set_index("row")
    conf = t["confidence"].astype(float)
    low = conf < conf.median()
    common = t.index
    for c in conditions:
        common = common.intersection(ev.correct(c).index)
    return common, low.loc[common].to_numpy(), t["correct"].astype(float).loc[common]


def f8_confidence_halves(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    rows, used = [], []
    for k, ev in enumerate(evs):
        if ev.baseline is None:
            continue
        sm, sh = _extreme_scaling(ev, True), _extreme_scaling(ev, False)
        if sm is None or sh is None:
            continue
        # each gain on its half's samples done under the baseline and its own condition
        # (the two cells of confidence_half_gains): one row per sample in capture order,
        # NaN in the other half's column
        cells = {}
        for cond, half_low in ((sm, True), (sh, False)):
            common, low, base = _halves(ev, (cond,))
            pick = low if half_low else ~low
            cells[cond] = ev.correct(cond).loc[common].astype(float)[pick] - base[pick]
        rows.append(pd.concat(cells, axis=1).sort_index().to_numpy(float))
        used.append(f"{ev.path.name}: {sm} / {sh}")
    if not rows:
        raise _Untestable("no capture with a baseline, a ScalingVis condition with alpha < 1 "
                          "and one with alpha > 1")
    D = np.concatenate(rows)
    _need_n(D.shape[0], "samples done under the baseline and their half's ScalingVis condition")
    gains = 100 * _nanmean_cols(D)
    value = float(np.min(gains))
    strata = np.concatenate([np.char.add(f"{k}:", np.isnan(r[:, 0]).astype(str))
                             for k, r in enumerate(rows)])  # keep each half's size
    lo, hi = ctx.interval(lambda idx: 100 * np.min(_col_means(D, idx), axis=1), D.shape[0], strata)
    v, why = _verdict(value, lo, hi, above=0.0)
    return (value, lo, hi, D.shape[0],
            f"smoothing gain on the low-confidence half {gains[0]:+.1f} pp, sharpening gain on "
            f"the high half {gains[1]:+.1f} pp ({'; '.join(used)}); {why}", v)


def f9_adaptvis_vs_scaling(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    parts, used, problems = [], [], []
    for ev in evs:
        try:
            ad, sc = ev.methods("adaptvis"), ev.methods("scaling")
            if not ad or not sc:
                raise _Untestable(f"{ev.path.name} lacks " + (
                    "an adaptvis condition" if not ad else "a scaling condition"))
            _need_split(ev)
            a, a_acc = _best_on_val(ev, ad)
            s, s_acc = _best_on_val(ev, sc)
        except _Untestable as exc:
            problems.append(str(exc))
            continue
        parts.append(_paired_test(ev, a, s))
        used.append(f"{ev.path.name}: {a} (val {100 * a_acc:.1f}%) vs {s} (val {100 * s_acc:.1f}%)")
    if not parts:
        raise _Untestable("; ".join(problems))
    d = np.concatenate(parts)
    _need_n(d.size, "test samples done under both chosen conditions")
    lo, hi = ctx.interval(lambda idx: 100 * d[idx].mean(axis=1), d.size, _strata(parts))
    v, why = _verdict(100 * float(d.mean()), lo, hi, above=0.0)
    return 100 * float(d.mean()), lo, hi, d.size, f"chosen on validation: {'; '.join(used)}; {why}", v


def f10_beats_contrastive(evs: Sequence[Evidence], ctx: _Ctx) -> _Result:
    rows, used, problems = [], [], []
    for ev in evs:
        try:
            ours = [c for c in ev.order if ev.attrs[c].get("method") in ("scaling", "adaptvis")]
            others = {m: ev.methods(m) for m in ("vcd", "dola") if ev.methods(m)}
            if not ours or not others:
                raise _Untestable(f"{ev.path.name} lacks " + (
                    "a scaling or adaptvis condition" if not ours else "a vcd or dola condition"))
            _need_split(ev)
            o, _ = _best_on_val(ev, ours)
            cols = {}
            for m in ("vcd", "dola"):
                if m in others:
                    b, _ = _best_on_val(ev, others[m])
                    cols[m] = _paired_test_rows(ev, o, b)
                    used.append(f"{ev.path.name}: {o} vs {b}")
        except _Untestable as exc:
            problems.append(str(exc))
            continue
        # one row per test sample, each difference on the samples done under its pair (NaN
        # where a pair is not done; column means leave NaN out)
        joined = pd.concat(cols, axis=1).reindex(columns=["vcd", "dola"])
        rows.append(joined.to_numpy(float))
    if not rows:
        raise _Untestable("; ".join(problems))
    D = np.concatenate(rows)
    _need_n(D.shape[0], "test samples")
    means, value, lo, hi = _extreme_mean(D, np.nanmin, _strata(rows), ctx)
    v, why = _verdict(value, lo, hi, above=0.0)
    missing = [m for m, k in (("VCD", 0), ("DoLa", 1)) if not np.isfinite(D[:, k]).any()]
    note = f" ({' and '.join(missing)} not captured: compared with the others only)" if missing else ""
    return value, lo, hi, D.shape[0], f"chosen on validation: {'; '.join(used)}{note}; {why}", v


#: id -> (claim, statistic, function)
FINDINGS: dict[str, tuple[str, str, Callable]] = {
    "F1": ("image tokens get a smaller share of the answer position's attention than their "
           "share of the prompt (§3.1, Fig. 3)",
           "mean over samples of (image share of prompt attention / image share of prompt "
           "tokens), middle third of the layers, baseline; reproduced if < 1", f1_attention_share),
    "F2": ("adding a positive constant to image attention logits does not improve accuracy "
           "(§3.2, Fig. 4)",
           "largest accuracy change (pp) of an add condition with delta > 0 vs the baseline, "
           "paired; reproduced unless > 0", f2_add_constant),
    "F3": ("overlap of attention with the object boxes predicts correctness (§4.1, Figs. 6-7)",
           "test AUROC of the baseline's attention/box overlap at the layer chosen on the "
           "validation split; reproduced if > 0.5", f3_overlap_auroc),
    "F4": ("F3 holds within each relation, so it is not the relation's difficulty (stricter "
           "than the paper)",
           "mean over relations of the within-relation test AUROC at F3's layer; reproduced "
           "if > 0.5", f4_within_relation),
    "F5": ("image attention is spread early and focused in the middle layers (Fig. 7)",
           "mean over samples of the baseline's entropy (Eq. 4, per head, averaged) in the "
           "first third of the layers minus the middle third (nats); reproduced if > 0",
           f5_entropy_by_depth),
    "F6": ("the model is more confident on familiar relations (left/right) than rare ones "
           "(on/under) (Fig. 15)",
           "mean baseline confidence on left/right minus on on/above/top/under/below/bottom "
           "(pp); reproduced if > 0", f6_familiar_confidence),
    "F7": ("confidence predicts correctness (Fig. 18)",
           "AUROC of the baseline's confidence for a correct answer; reproduced if > 0.5",
           f7_confidence_auroc),
    "F8": ("smoothing (alpha < 1) helps low-confidence samples and sharpening (alpha > 1) "
           "helps high-confidence ones (§5, Fig. 8)",
           "min of the accuracy gains (pp, paired vs the baseline) of smoothing on the "
           "low-confidence half and of sharpening on the high half; reproduced if > 0",
           f8_confidence_halves),
    "F9": ("AdaptVis with parameters chosen on validation beats the best fixed ScalingVis on "
           "test (Tables 1-2)",
           "test accuracy of the validation-best AdaptVis minus the validation-best ScalingVis "
           "(pp, paired); reproduced if > 0", f9_adaptvis_vs_scaling),
    "F10": ("ScalingVis/AdaptVis beat VCD and DoLa (Table 1)",
            "min over VCD and DoLa of the test accuracy of the validation-best ScalingVis/"
            "AdaptVis minus the validation-best baseline (pp, paired); reproduced if > 0",
            f10_beats_contrastive),
}


def run_findings(evidence: Sequence[Evidence], *, n_boot: int = metrics.N_BOOT, seed: int = 0,
                 level: float = 0.95) -> list[Finding]:
    """Evaluate F1-F10 on the (pooled) evidence of one or more captures."""
    if not evidence:
        raise VislensError("findings: no capture files")
    if n_boot < 10:
        raise VislensError(f"--n-boot {n_boot}: use at least 10 resamples")
    ctx = _Ctx(n_boot, seed, level)
    out = []
    for fid, (claim, statistic, fn) in FINDINGS.items():
        try:
            value, lo, hi, n, why, verdict = fn(evidence, ctx)
            out.append(Finding(fid, claim, statistic, float(value), float(lo), float(hi), int(n),
                               verdict, why))
        except _Untestable as exc:
            out.append(Finding(fid, claim, statistic, math.nan, math.nan, math.nan, 0,
                               "not testable", str(exc)))
    return out


#: columns of :func:`confidence_half_gains`
HALF_COLUMNS = ("condition", "half", "n", "baseline_accuracy", "accuracy", "gain_pp", "ci_low",
                "ci_high", "fixed", "broken")


def confidence_half_gains(evidence: Sequence[Evidence], *, conditions: Sequence[str] | None = None,
                          n_boot: int = metrics.N_BOOT, seed: int = 0, level: float = 0.95
                          ) -> pd.DataFrame:
    """Accuracy of every condition against the baseline on each confidence half (Fig. 8).

    The halves are F8's: per capture, samples whose baseline confidence is below its median
    are ``low``, the rest ``high``. One row per (condition, half), pooled over the captures
    that hold the condition: ``n`` samples done under both, the two accuracies, the paired
    gain in pp with its bootstrap interval (stratified by capture), and how many wrong
    baseline answers the condition fixed and how many right ones it broke. ``conditions``
    defaults to every non-baseline condition in file order (of the first capture holding
    each). F8 reads only two cells of this table (the extreme ScalingVis alphas); the table
    shows where, e.g. in which layers, a steering helps or hurts each half.
    """
    ctx = _Ctx(n_boot, seed, level)
    if conditions is None:
        conditions = list(dict.fromkeys(c for ev in evidence if ev.baseline is not None
                                        for c in ev.order if c != ev.baseline))
    out = []
    for cond in conditions:
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"low": [], "high": []}
        for ev in evidence:
            if ev.baseline is None or cond not in ev.attrs or cond == ev.baseline:
                continue
            common, low, base = _halves(ev, (cond,))
            new = ev.correct(cond).loc[common].to_numpy(float)
            for half, sel in (("low", low), ("high", ~low)):
                parts[half].append((base.to_numpy()[sel], new[sel]))
        if not parts["low"] and not parts["high"]:
            known = sorted({c for ev in evidence if ev.baseline is not None for c in ev.order})
            raise VislensError(f"condition {cond!r} is in no capture with a done baseline "
                               f"(conditions there: {', '.join(known) or 'none'})")
        for half in ("low", "high"):
            b = np.concatenate([p[0] for p in parts[half]]) if parts[half] else np.zeros(0)
            a = np.concatenate([p[1] for p in parts[half]]) if parts[half] else np.zeros(0)
            d = a - b
            lo = hi = math.nan
            if d.size >= MIN_SAMPLES:
                lo, hi = ctx.interval(lambda idx: 100 * d[idx].mean(axis=1), d.size,
                                      _strata([p[0] for p in parts[half]]))
            out.append(dict(condition=cond, half=half, n=int(d.size),
                            baseline_accuracy=float(b.mean()) if b.size else math.nan,
                            accuracy=float(a.mean()) if a.size else math.nan,
                            gain_pp=100 * float(d.mean()) if d.size else math.nan,
                            ci_low=float(lo), ci_high=float(hi),
                            fixed=int((d > 0).sum()), broken=int((d < 0).sum())))
    return pd.DataFrame(out, columns=list(HALF_COLUMNS))


def halves_markdown(table: pd.DataFrame) -> str:
    """:func:`confidence_half_gains` as a markdown table: one row per condition, both halves."""
    lines = ["| condition | low half: gain (pp) | 95% interval | fixed / broken | high half: gain (pp) "
             "| 95% interval | fixed / broken |", "|:---|---:|:---|---:|---:|:---|---:|"]
    for cond, g in table.groupby("condition", sort=False):
        cells = []
        for half in ("low", "high"):
            r = g[g["half"] == half].iloc[0]
            ci = f"[{r.ci_low:+.1f}, {r.ci_high:+.1f}]" if np.isfinite(r.ci_low) else "—"
            cells += [f"{r.gain_pp:+.1f}" if np.isfinite(r.gain_pp) else "—", ci,
                      f"{r.fixed} / {r.broken}"]
        lines.append(f"| `{cond}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: columns of :func:`scaling_headroom`
HEADROOM_COLUMNS = ("half", "n", "baseline_errors", "fixed_by_smoothing", "fixed_by_sharpening",
                    "fixed_by_any", "baseline_accuracy", "oracle_accuracy", "conditions")


def _alpha(ev: Evidence, cond: str) -> float:
    return float(ev.attrs[cond]["alpha"])


def _scaling_alphas(ev: Evidence) -> list[str]:
    """The capture's ScalingVis conditions that change anything (alpha != 1), in file order."""
    return [c for c in ev.methods("scaling") if _alpha(ev, c) != 1]


def scaling_headroom(evidence: Sequence[Evidence], *, conditions: Sequence[str] | None = None
                     ) -> pd.DataFrame:
    """How many of each confidence half's baseline errors *some* ScalingVis alpha fixes.

    An upper bound for any rule that picks alpha per sample among the captured ones (as
    AdaptVis picks between two by confidence): if few of a half's errors are fixed by any
    alpha, no choice of alpha can help that half, whatever its gain table says. Halves are
    F8's (per capture, baseline confidence below its median: ``low``). Per half, pooled over
    the captures: ``n`` samples done under the baseline and every ScalingVis condition of
    their capture, the baseline's wrong answers, how many of them at least one condition with
    alpha < 1 (``fixed_by_smoothing``), with alpha > 1 (``fixed_by_sharpening``) or either
    (``fixed_by_any``) answers right, and the oracle accuracy (right under the baseline or
    under any of the conditions). ``conditions`` defaults to every ScalingVis condition with
    alpha != 1; ``conditions`` (the count of distinct ones used) is the last column.
    """
    used: list[str] = []
    parts: dict[str, list[np.ndarray]] = {"low": [], "high": []}
    for ev in evidence:
        if ev.baseline is None:
            continue
        scaling = _scaling_alphas(ev)
        if conditions is not None:
            for c in conditions:
                if c in ev.attrs and c not in scaling:
                    raise VislensError(f"condition {c!r} in {ev.path.name} is not a ScalingVis "
                                       "condition with alpha != 1")
            scaling = [c for c in scaling if c in conditions]
        if not scaling:
            continue
        common, low, base = _halves(ev, scaling)
        right = np.stack([ev.correct(c).loc[common].to_numpy(bool) for c in scaling], axis=1)
        alphas = np.array([_alpha(ev, c) for c in scaling])
        cols = np.stack([base.to_numpy() > 0, right[:, alphas < 1].any(axis=1),
                         right[:, alphas > 1].any(axis=1)], axis=1)
        for half, sel in (("low", low), ("high", ~low)):
            parts[half].append(cols[sel])
        used += [c for c in scaling if c not in used]
    if conditions is not None:
        missing = [c for c in conditions if c not in used]
        if missing:
            raise VislensError(f"condition {missing[0]!r} is in no capture with a done baseline")
    if not used:
        raise VislensError("no capture with a done baseline and a ScalingVis condition "
                           "(alpha != 1)")
    out = []
    for half in ("low", "high"):
        x = np.concatenate(parts[half]) if parts[half] else np.zeros((0, 3), bool)
        base, smooth, sharp = x[:, 0], x[:, 1], x[:, 2]
        wrong = ~base
        out.append(dict(half=half, n=int(len(x)), baseline_errors=int(wrong.sum()),
                        fixed_by_smoothing=int((wrong & smooth).sum()),
                        fixed_by_sharpening=int((wrong & sharp).sum()),
                        fixed_by_any=int((wrong & (smooth | sharp)).sum()),
                        baseline_accuracy=float(base.mean()) if len(x) else math.nan,
                        oracle_accuracy=float((base | smooth | sharp).mean()) if len(x) else math.nan,
                        conditions=len(used)))
    return pd.DataFrame(out, columns=list(HEADROOM_COLUMNS))


def headroom_markdown(table: pd.DataFrame) -> str:
    """:func:`scaling_headroom` as a markdown table, one row per half."""
    lines = ["| half | n | baseline errors | fixed by some alpha < 1 | fixed by some alpha > 1 | "
             "fixed by any | baseline accuracy | oracle accuracy |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples():
        lines.append(f"| {r.half} | {r.n} | {r.baseline_errors} | {r.fixed_by_smoothing} | "
                     f"{r.fixed_by_sharpening} | {r.fixed_by_any} | {_num(r.baseline_accuracy)} | "
                     f"{_num(r.oracle_accuracy)} |")
    return "\n".join(lines)


def _num(x: float, fmt: str = ".3f") -> str:
    return "—" if not np.isfinite(x) else format(x, fmt)


def write_findings(paths: Sequence[str | Path], out_dir: str | Path, *,
                   n_boot: int = metrics.N_BOOT, seed: int = 0, chunk: int = 32
                   ) -> tuple[list[Finding], Path]:
    """Load the captures, evaluate the findings and write findings.md/.csv/.json."""
    paths = [Path(p) for p in paths]
    seen: dict[Path, Path] = {}
    for p in paths:
        if not p.is_file():
            raise VislensError(f"{p}: no such capture file")
        real = p.resolve()
        if real in seen:  # pooled twice, its samples would count double
            raise VislensError(f"{p}: given twice (also as {seen[real]}); each capture once")
        seen[real] = p
    evidence = [load_evidence(p, chunk=chunk) for p in paths]
    found = run_findings(evidence, n_boot=n_boot, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(f) for f in found]
    pd.DataFrame(rows).to_csv(out / "findings.csv", index=False)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
             for r in rows]
    (out / "findings.json").write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
    md = ["# Findings scorecard", "",
          "Captures: " + ", ".join(f"`{p.name}`" for p in paths), "",
          f"95% intervals: bootstrap over samples ({n_boot} resamples, seed {seed}; paired where "
          "conditions are compared). Definitions: docs/findings.md.", "",
          "| id | verdict | value | 95% interval | n | claim |",
          "|:---|:---|---:|:---|---:|:---|"]
    for f in found:
        ci = f"[{_num(f.ci_low)}, {_num(f.ci_high)}]" if np.isfinite(f.ci_low) else "—"
        md.append(f"| {f.id} | {f.verdict} | {_num(f.value)} | {ci} | {f.n} | {f.claim} |")
    md += ["", "## Details", ""]
    for f in found:
        md += [f"- **{f.id}** ({f.verdict}): {f.statistic}. {f.why[:1].upper()}{f.why[1:]}."]
    if any(ev.baseline is not None and len(ev.order) > 1 for ev in evidence):
        halves = confidence_half_gains(evidence, n_boot=n_boot, seed=seed)
        halves.to_csv(out / "confidence_halves.csv", index=False)
        md += ["", "## Accuracy gain by confidence half (Fig. 8)", "",
               "Every condition against the baseline on F8's halves (baseline confidence below / "
               "at or above its median in each capture), paired, pooled over the captures "
               "(`confidence_halves.csv`).", "", halves_markdown(halves)]
    if any(ev.baseline is not None and _scaling_alphas(ev) for ev in evidence):
        head = scaling_headroom(evidence)
        head.to_csv(out / "scaling_headroom.csv", index=False)
        md += ["", "## Headroom of ScalingVis by confidence half", "",
               f"How many baseline errors of each half at least one of the "
               f"{int(head['conditions'].iloc[0])} ScalingVis conditions fixes: a ceiling for any "
               "per-sample choice of alpha among them (AdaptVis with two of these alphas is one) "
               "(`scaling_headroom.csv`).", "", headroom_markdown(head)]
    md.append("")
    path = out / "findings.md"
    path.write_text("\n".join(md))
    return found, path


def scorecard_text(found: Sequence[Finding]) -> str:
    """A short plain-text scorecard for the terminal: one line per finding."""
    lines = []
    for f in found:
        ci = f" [{_num(f.ci_low)}, {_num(f.ci_high)}]" if np.isfinite(f.ci_low) else ""
        val = _num(f.value)
        lines.append(f"{f.id:<4} {f.verdict:<15} {val}{ci}  n={f.n}  {f.why}")
    return "\n".join(lines)
