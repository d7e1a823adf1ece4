"""``vislens sweep``: tune ScalingVis and AdaptVis on the validation split, report on test.

Three stages, each writing into one output folder:

1. **Validation pass** (:func:`validation_pass`): one :class:`~vislens.decoding.DecodingEngine`
   run per batch with ``baseline`` plus ``scaling:alpha=a`` for every alpha the grid mentions,
   so all alphas share each batch's prefix prefill. Nothing is recorded; the result is a
   per-sample table (``val_results.csv``): baseline confidence, and per alpha the answer
   and whether it is correct.
2. **Offline selection** (:func:`scaling_scores`, :func:`adaptvis_scores`): AdaptVis at
   ``(alpha1, alpha2, beta)`` answers sample ``i`` exactly as ``scaling:alpha=alpha_i`` does
   in the same batch, with ``alpha_i`` from Eq. 3 (:func:`~vislens.conditions.adaptvis_alpha`)
   on the *baseline* confidence. So every beta costs a table look-up, not a model run.
   Ties go to the setting closest to no intervention (see :func:`pick_scaling`,
   :func:`pick_adaptvis`). On yes/no data (VSR) beta follows the paper's rule instead of
   the grid: the mean of the two labels' average confidences (:func:`label_mean_beta`).
3. **Test capture** (:func:`~vislens.capture.run_capture` into ``test.h5``) with greedy,
   the chosen ScalingVis and AdaptVis and the requested baselines, evaluated into a
   Table-1-style comparison (``table1.md``/``table1.csv``).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .conditions import adaptvis_alpha, parse_condition
from .evaluate import is_yes_no
from .errors import VislensError
from .io import add_force_argument

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_ALPHA1", "DEFAULT_ALPHA2", "DEFAULT_BETAS", "BASELINES",
           "SweepGrid", "ValResults", "Choice", "SweepResult", "parse_values", "parse_betas",
           "parse_baselines", "make_grid", "validation_pass", "scaling_scores",
           "adaptvis_scores", "pick_scaling", "pick_adaptvis", "choose", "conditions_for_test",
           "BETA_RULES", "is_yes_no", "label_mean_beta", "resolve_beta_rule",
           "table1_frame", "table1_markdown", "plot_curves", "curves_figure", "read_val_results",
           "run_sweep",
           "add_arguments", "run_args", "main"]

DEFAULT_ALPHAS = "0.5,0.8,1.2,1.5,2.0"
DEFAULT_ALPHA1 = "0.5,0.8"
DEFAULT_ALPHA2 = "1.2,1.5,2.0"
DEFAULT_BETAS = "0.20:0.55:0.05"
#: baseline name -> the decoding condition the test capture runs for it
BASELINES: dict[str, str] = {"vcd": "vcd:alpha=1,beta=0.1,noise_steps=500",
                             "dola": "dola:layers=high"}
#: Table 1 rows: method -> capture condition name
METHOD_CONDITIONS: dict[str, str] = {"greedy": "baseline", "scalingvis": "scalingvis",
                                     "adaptvis": "adaptvis", "vcd": "vcd", "dola": "dola"}
TIE_BREAK = ("most correct validation answers; ties -> closest to no intervention: smallest "
             "mean |ln alpha| applied over the validation samples, then smallest "
             "|ln alpha1| + |ln alpha2| (AdaptVis), then the smaller beta / alpha")
_DECIMALS = 12  # tie keys are rounded so float noise cannot break a mathematical tie
#: how AdaptVis's beta is chosen: ``auto`` = ``label-mean`` on yes/no data, else ``grid``
BETA_RULES = ("auto", "grid", "label-mean")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- the grid

def _numbers(flag: str, value: str | Iterable[float | str], shown: str | None = None
             ) -> list[float]:
    """Floats from a comma list (or an iterable); a bad item names ``flag``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    shown = shown if shown is not None else _show(value)
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            out.append(float(text))
        except ValueError:
            raise VislensError(f"{flag} {shown}: {text!r} is not a number") from None
    if not out:
        raise VislensError(f"{flag} {shown}: no values")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise VislensError(f"{flag} {shown}: {bad[0]} is not finite")
    return out


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else repr(",".join(map(str, value)))


def parse_values(flag: str, value: str | Iterable[float | str]) -> tuple[float, ...]:
    """Alphas from ``"0.5,0.8"`` (or numbers): sorted, unique, each finite and > 0."""
    vals = _numbers(flag, value)
    bad = [v for v in vals if v <= 0]
    if bad:
        raise VislensError(f"{flag} {_show(value)}: {bad[0]:g} must be > 0 (an attention temperature)")
    return tuple(sorted(set(vals)))


def parse_betas(value: str | Iterable[float | str], flag: str = "--betas") -> tuple[float, ...]:
    """Betas from ``start:stop:step`` (stop included within float tolerance) or a comma list.

    Range values are rounded to 10 decimals, so ``0.20:0.55:0.05`` gives exactly 0.2, 0.25,
    ..., 0.55 (8 values). Each beta must lie in [0, 1].
    """
    if isinstance(value, str) and ":" in value:
        parts = value.split(":")
        if len(parts) != 3:
            raise VislensError(f"{flag} {value!r}: expected start:stop:step or a comma list")
        if not all(p.strip() for p in parts):
            raise VislensError(f"{flag} {value!r}: expected start:stop:step, e.g. 0.2:0.55:0.05")
        start, stop, step = (_numbers(flag, [p], repr(value))[0] for p in parts)
        if step <= 0:
            raise VislensError(f"{flag} {value!r}: step must be > 0")
        if stop < start:
            raise VislensError(f"{flag} {value!r}: stop must be >= start")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > 10_000:
            raise VislensError(f"{flag} {value!r}: {count} values; use a coarser step")
        vals = [round(start + k * step, 10) for k in range(count)]
    else:
        vals = _numbers(flag, value)
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise VislensError(f"{flag} {_show(value)}: {bad[0]:g} is outside [0, 1] (a probability)")
    return tuple(sorted(set(vals)))


def parse_baselines(value: str | Iterable[str] | None, flag: str = "--baselines") -> tuple[str, ...]:
    """``"vcd,dola"`` -> ("vcd", "dola"); empty or ``none`` -> ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(i).strip().lower() for i in items if str(i).strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise VislensError(f"{flag} {_show(value)}: unknown baseline {bad[0]!r} "
                           f"(choose from {', '.join(BASELINES)})")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class SweepGrid:
    """The hyper-parameter candidates of one sweep (validated, sorted, unique)."""

    alphas: tuple[float, ...]
    alpha1: tuple[float, ...]
    alpha2: tuple[float, ...]
    betas: tuple[float, ...]
    baselines: tuple[str, ...] = ()

    @property
    def scaling_alphas(self) -> tuple[float, ...]:
        """ScalingVis candidates: ``alphas`` plus 1 (greedy is always a candidate)."""
        return tuple(sorted(set(self.alphas) | {1.0}))

    @property
    def pairs(self) -> list[tuple[float, float]]:
        """AdaptVis (alpha1, alpha2) pairs; alpha1 > alpha2 is skipped (decoding rejects it)."""
        return [(a1, a2) for a1 in self.alpha1 for a2 in self.alpha2 if a1 <= a2]

    @property
    def skipped_pairs(self) -> list[tuple[float, float]]:
        return [(a1, a2) for a1 in self.alpha1 for a2 in self.alpha2 if a1 > a2]

    @property
    def run_alphas(self) -> tuple[float, ...]:
        """Every alpha the validation pass runs (1 = the baseline step)."""
        return tuple(sorted(set(self.scaling_alphas) | set(self.alpha1) | set(self.alpha2)))


def make_grid(alphas: str | Iterable[float] = DEFAULT_ALPHAS,
              alpha1: str | Iterable[float] = DEFAULT_ALPHA1,
              alpha2: str | Iterable[float] = DEFAULT_ALPHA2,
              betas: str | Iterable[float] | None = None,
              baselines: str | Iterable[str] | None = (), *, log: Log = _stderr) -> SweepGrid:
    """Validate the flags into a :class:`SweepGrid`; warns (via ``log``) about alpha1 > alpha2.
    ``betas`` None means :data:`DEFAULT_BETAS`."""
    grid = SweepGrid(parse_values("--alphas", alphas), parse_values("--alpha1", alpha1),
                     parse_values("--alpha2", alpha2),
                     parse_betas(DEFAULT_BETAS if betas is None else betas),
                     parse_baselines(baselines))
    skipped = grid.skipped_pairs
    if skipped and not grid.pairs:
        raise VislensError(f"--alpha1/--alpha2: every pair has alpha1 > alpha2 (e.g. "
                           f"{skipped[0][0]:g} > {skipped[0][1]:g}); AdaptVis smooths with "
                           "alpha1 and sharpens with alpha2")
    if skipped:
        log(f"warning: --alpha1/--alpha2: skipping {len(skipped)} pair(s) with alpha1 > alpha2 "
            f"({', '.join(f'{a:g}>{b:g}' for a, b in skipped)}): AdaptVis needs alpha1 <= alpha2")
    return grid


# ----------------------------------------------------------------------------- validation

def _label(alpha: float) -> str:
    """Column suffix of an alpha (round-trips through ``float``)."""
    return repr(float(alpha))


@dataclass
class ValResults:
    """Per-sample validation answers: baseline confidence and, per alpha, answer/correctness.

    ``samples`` has columns id, relation, group, answer, confidence; ``predictions`` and
    ``correct`` are ``[N, len(alphas)]``; alpha 1 is the baseline's answer.
    """

    samples: pd.DataFrame
    alphas: tuple[float, ...]
    predictions: np.ndarray
    correct: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        return self.samples["confidence"].to_numpy(dtype=np.float64)

    def __len__(self) -> int:
        return len(self.samples)

    def column(self, alpha: float) -> int:
        try:
            return self.alphas.index(float(alpha))
        except ValueError:
            raise VislensError(f"alpha {alpha:g} was not run on the validation split "
                               f"(have {', '.join(f'{a:g}' for a in self.alphas)})") from None

    def to_frame(self) -> pd.DataFrame:
        """The tidy per-sample table written as ``val_results.csv``."""
        df = self.samples.copy()
        for k, a in enumerate(self.alphas):
            df[f"prediction_{_label(a)}"] = self.predictions[:, k]
            df[f"correct_{_label(a)}"] = self.correct[:, k]
        return df

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "ValResults":
        alphas = tuple(sorted(float(c[len("correct_"):]) for c in df.columns
                              if c.startswith("correct_")))
        if not alphas:
            raise VislensError("validation table has no correct_<alpha> columns")
        corr = np.array([[_to_bool(v) for v in df[f"correct_{_label(a)}"]] for a in alphas],
                        dtype=bool).T.reshape(len(df), len(alphas))
        preds = np.array([df[f"prediction_{_label(a)}"].astype(str).tolist() for a in alphas],
                         dtype=object).T.reshape(len(df), len(alphas))
        samples = df[["id", "relation", "group", "answer"]].astype(str).copy()
        samples["confidence"] = [float(v) for v in df["confidence"]]
        return cls(samples.reset_index(drop=True), alphas, preds, corr)


def _to_bool(v: Any) -> bool:
    text = str(v).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise VislensError(f"validation table: {v!r} is not a boolean")
    return text in ("true", "1")


def read_val_results(path: str | Path) -> ValResults:
    """Load a ``val_results.csv`` back (exact floats), e.g. to re-select with other betas."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return ValResults.from_frame(df)


def _scaling_condition(alpha: float, name: str):
    return parse_condition(f"scaling:alpha={_label(alpha)},name={name}")


def validation_pass(adapter: Any, samples: Sequence[Any], alphas: Iterable[float], *,
                    batch_size: int = 8, max_new_tokens: int = 8, matcher: str = "paper",
                    progress: bool = False) -> ValResults:
    """Answers under ``baseline`` and ``scaling:alpha=a`` for each alpha, one engine run per batch.

    Alpha 1 is the baseline itself (added when missing). No attention is recorded. The
    batches are the capture's (:func:`vislens.capture.batches_of`), in this process or on a
    Ray pool.
    """
    from .capture import batches_of

    alphas = tuple(sorted(set(float(a) for a in alphas) | {1.0}))
    names = {a: "baseline" if a == 1.0 else f"alpha{k}" for k, a in enumerate(alphas)}
    conds = [parse_condition("baseline")] + [_scaling_condition(a, names[a]) for a in alphas
                                             if a != 1.0]
    n, k = len(samples), len(alphas)
    conf = np.full(n, np.nan)
    preds = np.empty((n, k), dtype=object)
    corr = np.zeros((n, k), dtype=bool)
    for batch in batches_of(adapter, samples, range(n), conds,
                            engine={"max_new_tokens": max_new_tokens, "record": False},
                            batch_size=batch_size, matcher=matcher, progress=progress,
                            desc="sweep (val)"):
        for i, res, ok in zip(batch.rows, batch.results, batch.correct):
            conf[i] = res["baseline"].confidence
            for c, a in enumerate(alphas):
                preds[i, c] = res[names[a]].text
                corr[i, c] = ok[names[a]]
    meta = pd.DataFrame({"id": [s.id for s in samples], "relation": [s.relation for s in samples],
                         "group": [s.group for s in samples],
                         "answer": [s.answer for s in samples], "confidence": conf})
    return ValResults(meta, alphas, preds, corr)


# ----------------------------------------------------------------------------- selection

def _strength(alpha: float | np.ndarray) -> np.ndarray:
    """|ln alpha|: how far a temperature is from no intervention (0.5 and 2 are equally far)."""
    return np.abs(np.log(np.asarray(alpha, dtype=np.float64)))


def scaling_scores(val: ValResults, alphas: Iterable[float]) -> pd.DataFrame:
    """Validation accuracy (percent) of ScalingVis at each alpha (alpha 1 = greedy)."""
    n = len(val)
    rows = []
    for a in sorted(set(float(x) for x in alphas)):
        hits = int(val.correct[:, val.column(a)].sum())
        rows.append({"alpha": a, "n": n, "n_correct": hits,
                     "acc": 100.0 * hits / n if n else float("nan")})
    return pd.DataFrame(rows, columns=["alpha", "n", "n_correct", "acc"])


def adaptvis_scores(val: ValResults, pairs: Iterable[tuple[float, float]],
                    betas: Iterable[float]) -> pd.DataFrame:
    """Validation accuracy of AdaptVis at every (alpha1, alpha2, beta), from the table alone.

    Sample i takes alpha1's answer when its baseline confidence is < beta, else alpha2's
    (Eq. 3 via :func:`~vislens.conditions.adaptvis_alpha`, so confidence == beta -> alpha2).
    Also returns ``n_below_beta`` (samples given alpha1) and ``mean_abs_log_alpha`` (the
    average |ln alpha| applied, the intervention strength used to break ties).
    """
    conf, n = val.confidence, len(val)
    rows, run = np.arange(n), np.asarray(val.alphas)
    out = []
    for a1, a2 in pairs:
        val.column(a1), val.column(a2)  # both must have been run
        for beta in betas:
            alpha_i = adaptvis_alpha(conf, a1, a2, beta)
            hits = int(val.correct[rows, np.searchsorted(run, alpha_i)].sum())
            out.append({"alpha1": float(a1), "alpha2": float(a2), "beta": float(beta), "n": n,
                        "n_correct": hits, "acc": 100.0 * hits / n if n else float("nan"),
                        "n_below_beta": int((conf < beta).sum()),
                        "mean_abs_log_alpha": float(_strength(alpha_i).mean()) if n else 0.0})
    return pd.DataFrame(out, columns=["alpha1", "alpha2", "beta", "n", "n_correct", "acc",
                                      "n_below_beta", "mean_abs_log_alpha"])


def pick_scaling(scores: pd.DataFrame) -> pd.Series:
    """The best alpha: most correct; ties -> smallest |ln alpha| (alpha 1 wins), then smaller alpha."""
    if scores.empty:
        raise VislensError("no ScalingVis candidates to choose from")
    keys = [(-int(r.n_correct), round(float(_strength(r.alpha)), _DECIMALS), float(r.alpha))
            for r in scores.itertuples()]
    return scores.iloc[min(range(len(keys)), key=keys.__getitem__)]


def pick_adaptvis(scores: pd.DataFrame) -> pd.Series:
    """The best (alpha1, alpha2, beta): most correct; ties -> closest to no intervention.

    Closeness is the mean |ln alpha_i| actually applied over the validation samples, then
    |ln alpha1| + |ln alpha2|, then the smaller beta, alpha1, alpha2.
    """
    if scores.empty:
        raise VislensError("no AdaptVis candidates to choose from")
    keys = [(-int(r.n_correct), round(float(r.mean_abs_log_alpha), _DECIMALS),
             round(float(_strength(r.alpha1) + _strength(r.alpha2)), _DECIMALS),
             float(r.beta), float(r.alpha1), float(r.alpha2)) for r in scores.itertuples()]
    return scores.iloc[min(range(len(keys)), key=keys.__getitem__)]


def label_mean_beta(val: ValResults) -> float:
    """VSR's beta (the paper's rule for yes/no data): the mean of the two labels' average
    baseline confidences, i.e. ``(mean conf | gold yes + mean conf | gold no) / 2`` on the
    validation split. Both labels must occur there."""
    labels = val.samples["answer"].astype(str).str.strip().str.lower().to_numpy()
    if not is_yes_no(labels):
        raise VislensError("--beta-rule label-mean needs yes/no data (every gold answer yes "
                           "or no)")
    conf = val.confidence
    means = []
    for label in ("yes", "no"):
        sel = labels == label
        if not sel.any():
            raise VislensError(f"--beta-rule label-mean: no validation sample has the gold "
                               f"answer {label!r}; use --beta-rule grid or more samples")
        means.append(float(conf[sel].mean()))
    return float(np.mean(means))


def resolve_beta_rule(val: "ValResults | Sequence[str]", rule: str = "auto") -> str:
    """``grid`` or ``label-mean``: ``auto`` picks ``label-mean`` on yes/no data (``val``: the
    validation table or its gold answers)."""
    if rule not in BETA_RULES:
        raise VislensError(f"--beta-rule {rule!r}: choose {', '.join(BETA_RULES)}")
    if rule == "auto":
        answers = val.samples["answer"] if isinstance(val, ValResults) else val
        return "label-mean" if is_yes_no(answers) else "grid"
    return rule


@dataclass
class Choice:
    """The selected hyper-parameters with every candidate's validation accuracy.

    ``beta_rule`` says how beta was found: ``grid`` (searched with the alphas) or
    ``label-mean`` (VSR's rule, :func:`label_mean_beta`; one beta for every pair).
    """

    scaling: pd.DataFrame
    adaptvis: pd.DataFrame
    alpha: float
    alpha1: float
    alpha2: float
    beta: float
    beta_rule: str = "grid"

    def row(self, which: str) -> pd.Series:
        if which == "scalingvis":
            return self.scaling[self.scaling["alpha"] == self.alpha].iloc[0]
        a = self.adaptvis
        return a[(a["alpha1"] == self.alpha1) & (a["alpha2"] == self.alpha2)
                 & (a["beta"] == self.beta)].iloc[0]

    @property
    def greedy(self) -> pd.Series:
        return self.scaling[self.scaling["alpha"] == 1.0].iloc[0]


def choose(val: ValResults, grid: SweepGrid, beta_rule: str = "auto") -> Choice:
    """Score every candidate on the validation table and pick the best of each method.

    AdaptVis's beta comes from ``grid.betas`` or, with the ``label-mean`` rule (``auto`` on
    yes/no data), is :func:`label_mean_beta` for every (alpha1, alpha2) pair."""
    rule = resolve_beta_rule(val, beta_rule)
    betas = (label_mean_beta(val),) if rule == "label-mean" else grid.betas
    scaling = scaling_scores(val, grid.scaling_alphas)
    adaptive = adaptvis_scores(val, grid.pairs, betas)
    best_s, best_a = pick_scaling(scaling), pick_adaptvis(adaptive)
    scaling["chosen"] = scaling["alpha"] == best_s["alpha"]
    adaptive["chosen"] = ((adaptive["alpha1"] == best_a["alpha1"])
                          & (adaptive["alpha2"] == best_a["alpha2"])
                          & (adaptive["beta"] == best_a["beta"]))
    return Choice(scaling, adaptive, float(best_s["alpha"]), float(best_a["alpha1"]),
                  float(best_a["alpha2"]), float(best_a["beta"]), rule)


def conditions_for_test(choice: Choice, baselines: Sequence[str] = ()) -> list[str]:
    """The test capture's conditions: greedy, the chosen methods, then the baselines."""
    conds = ["baseline", f"scaling:alpha={_label(choice.alpha)},name=scalingvis",
             f"adaptvis:alpha1={_label(choice.alpha1)},alpha2={_label(choice.alpha2)},"
             f"beta={_label(choice.beta)},name=adaptvis"]
    return conds + [f"{BASELINES[b]},name={b}" for b in baselines]


def _spec_and_name(cond: str) -> tuple[str, str]:
    """``"scaling:alpha=2.0,name=scalingvis"`` -> ("scaling:alpha=2.0", "scalingvis")."""
    spec, sep, name = cond.rpartition(",name=")
    return (spec, name) if sep else (cond, cond)


# ----------------------------------------------------------------------------- Table 1

def table1_frame(accuracy: pd.DataFrame, vsr: pd.DataFrame | None,
                 methods: dict[str, str], specs: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows = methods, columns = metrics and their change against greedy (percentage points).

    ``accuracy``: :func:`~vislens.evaluate.evaluate_capture`'s accuracy table for one
    matcher (index = condition); ``vsr``: its VSR table for that matcher, or None.
    ``methods`` maps row name -> condition name, greedy first. Metrics: ``acc`` always;
    ``pair_acc``/``set_acc`` when present (Controlled-style groups); ``f1`` and ``f1_paper``
    (x 100) for yes/no data. Each accuracy is followed by ``X_low``, ``X_high``: its Wilson
    95% interval in percent (taken from ``accuracy`` when there, else from ``acc`` and ``n``).
    """
    from .metrics import wilson_interval

    accs = ["acc"] + [m for m in ("pair_acc", "set_acc") if m in accuracy.columns]
    metrics = list(accs)
    vsr_by = None
    if vsr is not None and not vsr.empty:
        vsr_by = vsr.set_index("condition")
        metrics += ["f1", "f1_paper"]
    rows = []
    for method, cond in methods.items():
        if cond not in accuracy.index:
            raise VislensError(f"condition {cond!r} missing from the evaluation")
        n = int(accuracy.loc[cond, "n"])
        row: dict[str, Any] = {"method": method, "condition": (specs or {}).get(method, cond),
                               "n": n}
        for m in metrics:
            row[m] = float(accuracy.loc[cond, m]) if m in accuracy.columns \
                else 100.0 * float(vsr_by.loc[cond, m])
        for m in accs:
            if f"{m}_low" in accuracy.columns:
                lo, hi = (float(accuracy.loc[cond, f"{m}_{e}"]) for e in ("low", "high"))
            elif m == "acc" and n and not math.isnan(row[m]):
                lo, hi = (100.0 * v for v in wilson_interval(round(row[m] * n / 100), n))
            else:
                lo = hi = math.nan
            row[f"{m}_low"], row[f"{m}_high"] = lo, hi
        rows.append(row)
    df = pd.DataFrame(rows).set_index("method")
    greedy = df.iloc[0]
    cols = ["condition", "n"]
    for m in metrics:
        df[f"{m}_delta"] = df[m] - greedy[m]
        cols += [m] + ([f"{m}_low", f"{m}_high"] if m in accs else []) + [f"{m}_delta"]
    return df[cols]


def table1_markdown(table: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """Markdown of :func:`table1_frame` with signed deltas (e.g. ``+2.5``)."""
    from .evaluate import to_markdown

    shown = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith("_delta"):
            shown["Δ " + col[:-len("_delta")]] = [
                "nan" if math.isnan(v) else f"{v:+.1f}" for v in table[col]]
        else:
            shown[col] = table[col]
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n" + to_markdown(shown, floatfmt=".1f")


_CURVE_MARKERS = ("s", "^", "D", "v", "P", "X", "h")


def _wilson_band(n_correct: Any, n: Any) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson interval (percent) of each validation accuracy."""
    from .metrics import wilson_interval

    lo, hi = wilson_interval(np.asarray(n_correct, dtype=np.int64), np.asarray(n, dtype=np.int64))
    return 100.0 * np.asarray(lo), 100.0 * np.asarray(hi)


def plot_curves(choice: Choice, path: str | Path, title: str = "") -> Path:
    """``val_curves.png``: :func:`curves_figure` saved to ``path``."""
    from .plots import vislens_style

    fig = curves_figure(choice, title)
    path = Path(path)
    with vislens_style():
        fig.savefig(path, dpi=120)
    return path


def curves_figure(choice: Choice, title: str = "") -> "Figure":
    """ScalingVis accuracy vs alpha; AdaptVis accuracy vs beta per (alpha1, alpha2) pair.

    vislens's plot style; shaded bands are 95% Wilson intervals of each validation
    accuracy (on AdaptVis, of the chosen pair's curve); the chosen setting is starred and its
    AdaptVis curve drawn last and thicker;
    legends sit outside the axes. With the ``label-mean`` beta rule every pair has one beta,
    so the AdaptVis panel shows validation accuracy per (alpha1, alpha2) pair at that beta.
    """
    import matplotlib as mpl

    from .plots import CMAP, vislens_style

    with vislens_style():
        from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg)

        fig = Figure(figsize=(12, 4.4), layout="constrained")
        ax_s, ax_a = fig.subplots(1, 2)
        greedy = float(choice.greedy["acc"])
        star = dict(marker="*", markersize=15, color="crimson", markeredgecolor="white",
                    linestyle="none", zorder=5)
        s = choice.scaling
        color_s = mpl.colormaps[CMAP](0.25)
        lo, hi = _wilson_band(s["n_correct"], s["n"])
        ax_s.fill_between(s["alpha"], lo, hi, color=color_s, alpha=0.18, linewidth=0,
                          label="95% Wilson interval")
        ax_s.plot(s["alpha"], s["acc"], marker="o", color=color_s, label="ScalingVis")
        ax_s.set_xscale("log")
        ax_s.set_xticks(s["alpha"].tolist(), [f"{a:g}" for a in s["alpha"]])
        ax_s.minorticks_off()
        best = choice.row("scalingvis")
        ax_s.plot([best["alpha"]], [best["acc"]], **star, label=f"chosen α = {best['alpha']:g}")
        ax_s.set(xlabel="alpha (log scale)", ylabel="validation accuracy (%)", title="ScalingVis")
        best_a = choice.row("adaptvis")
        pairs = list(choice.adaptvis.groupby(["alpha1", "alpha2"], sort=True))
        chosen_pair = (best_a["alpha1"], best_a["alpha2"])
        pairs.sort(key=lambda kv: kv[0] == chosen_pair)  # the chosen curve last, on top
        colors = mpl.colormaps[CMAP](np.linspace(0.0, 0.85, max(len(pairs), 2)))
        single = choice.beta_rule == "label-mean"
        for i, ((a1, a2), part) in enumerate(pairs):
            is_best = (a1, a2) == chosen_pair
            label = f"α1={a1:g}, α2={a2:g}" + (" (chosen)" if is_best else "")
            x = np.full(len(part), float(i)) if single else part["beta"].to_numpy()
            lo, hi = _wilson_band(part["n_correct"], part["n"])
            if single:
                ax_a.errorbar(x, part["acc"], yerr=[part["acc"] - lo, hi - part["acc"]],
                              color=colors[i], marker="o", capsize=3,
                              linewidth=2.2 if is_best else 1.2, label=label)
            else:
                if is_best:  # one band: the others' would hide the curves
                    ax_a.fill_between(x, lo, hi, color=colors[i], alpha=0.2, linewidth=0,
                                      label="95% Wilson interval (chosen)")
                ax_a.plot(x, part["acc"], color=colors[i], label=label,
                          marker="o" if is_best else _CURVE_MARKERS[i % len(_CURVE_MARKERS)],
                          linestyle="-" if is_best or i % 2 == 0 else "--",
                          linewidth=3.0 if is_best else 1.2, zorder=4 if is_best else 2)
        bx = float(len(pairs) - 1) if single else best_a["beta"]
        ax_a.plot([bx], [best_a["acc"]], **star, label=f"chosen β = {best_a['beta']:.3g}")
        if single:
            ax_a.set_xticks(range(len(pairs)), [f"{a1:g}/{a2:g}" for (a1, a2), _ in pairs])
            ax_a.set(xlabel="α1 / α2 (β = mean of the two labels' average confidences)",
                     title="AdaptVis (β by the paper's yes/no rule)")
        else:
            ax_a.set(xlabel="beta (confidence threshold)", title="AdaptVis")
        ax_a.set(ylabel="validation accuracy (%)")
        for ax in (ax_s, ax_a):
            ax.axhline(greedy, color="0.45", linestyle="--", linewidth=1, label="greedy")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5)
        if title:
            fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- the job

@dataclass
class SweepResult:
    """What a sweep chose and wrote."""

    out: Path
    grid: SweepGrid
    choice: Choice
    val: ValResults
    table1: pd.DataFrame
    chosen: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _load_splits(dataset: str, data_root: str | None, split_seed: int, limit: int | None):
    """Validation and test samples, checked (prompts, images) before any model is loaded."""
    from .capture import check_options_in_prompt, select_samples
    from .data import check_images

    val, _ = select_samples(dataset, data_root, split="val", limit=limit, split_seed=split_seed)
    test, _ = select_samples(dataset, data_root, split="test", limit=limit, split_seed=split_seed)
    for name, part in (("validation", val), ("test", test)):
        if not part:
            raise VislensError(f"dataset {dataset}: the {name} split is empty; a sweep needs "
                               "samples in both (the validation split is 20% of the data, unless "
                               "its records name their own split)")
    check_options_in_prompt(val + test)
    problems = check_images(val + test)
    if problems:
        sid, reason = problems[0]
        raise VislensError(f"sample {sid}: {reason} ({len(problems)} bad image(s))")
    return val, test


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def _chosen_record(choice: Choice, grid: SweepGrid, conds: list[str], **meta: Any) -> dict[str, Any]:
    def acc(row: pd.Series) -> dict[str, Any]:
        return {"val_acc": _json_float(float(row["acc"])), "val_correct": int(row["n_correct"]),
                "n_val": int(row["n"])}

    return {
        **meta,
        "greedy": {"condition": conds[0], **acc(choice.greedy)},
        "scalingvis": {"alpha": choice.alpha, "condition": conds[1], **acc(choice.row("scalingvis"))},
        "adaptvis": {"alpha1": choice.alpha1, "alpha2": choice.alpha2, "beta": choice.beta,
                     "beta_rule": choice.beta_rule, "condition": conds[2],
                     **acc(choice.row("adaptvis"))},
        "baselines": {_spec_and_name(c)[1]: _spec_and_name(c)[0] for c in conds[3:]},
        "grid": {"scaling_alphas": list(grid.scaling_alphas), "alpha1": list(grid.alpha1),
                 "alpha2": list(grid.alpha2), "betas": list(grid.betas),
                 "skipped_pairs": [list(p) for p in grid.skipped_pairs]},
        "tie_break": TIE_BREAK,
    }


def run_sweep(*, model: str | Any, dataset: str, out: str | Path, data_root: str | None = None,
              alphas: str | Iterable[float] = DEFAULT_ALPHAS,
              alpha1: str | Iterable[float] = DEFAULT_ALPHA1,
              alpha2: str | Iterable[float] = DEFAULT_ALPHA2,
              betas: str | Iterable[float] | None = None,
              baselines: str | Iterable[str] | None = (), batch_size: int = 8,
              max_new_tokens: int = 8, matcher: str = "paper", split_seed: int = 0,
              limit: int | None = None, dtype: str = "auto", device: str = "auto",
              grid: int = 24, progress: bool = True, command: str | None = None,
              force: bool = False, beta_rule: str = "auto", log: Log = print,
              ray: str | None = None, workers: int | None = None,
              gpus_per_worker: float | None = None) -> SweepResult:
    """Tune ScalingVis/AdaptVis on the validation split, then compare methods on test.

    ``model`` is a name/path for :func:`~vislens.models.load_model`, a loaded adapter or a
    :class:`vislens.distributed.ReplicaPool` (a loaded one refuses a ``dtype`` / ``device``
    it does not have: :func:`vislens.capture.check_loaded_model`). With ``ray`` both passes run on ``workers``
    Ray actors that load the model once (``docs/scale.md``).
    Every flag is validated before the model is loaded. ``out`` must be new, empty or a
    sweep's own folder (``force`` writes into any other). ``beta_rule`` (:data:`BETA_RULES`)
    picks AdaptVis's beta by grid search over ``betas`` (None: :data:`DEFAULT_BETAS`) or, on
    yes/no data, by the paper's label-mean rule (:func:`choose`), which refuses ``betas``
    (they would be ignored). Writes into ``out``:
    ``val_results.csv``, ``val_scaling.csv``, ``val_adaptvis.csv``, ``val_curves.png``,
    ``chosen.json``, ``test.h5`` (resumed if compatible), ``table1.csv``, ``table1.md``.
    """
    from .distributed import check_ray_options, open_session
    from .io import prepare_output_dir
    from .jobs import check_job

    space = make_grid(alphas, alpha1, alpha2, betas, baselines, log=log)
    if beta_rule not in BETA_RULES:
        raise VislensError(f"--beta-rule {beta_rule!r}: choose {', '.join(BETA_RULES)}")
    check_job(batch_size=batch_size, max_new_tokens=max_new_tokens, grid=grid, matcher=matcher)
    check_ray_options(ray, workers, gpus_per_worker)
    if ray is None and not isinstance(model, (str, Path)):
        from .capture import check_loaded_model

        check_loaded_model(model, dtype=dtype, device=device)  # never silently ignored
    val_samples, test_samples = _load_splits(dataset, data_root, split_seed, limit)
    if betas is not None and resolve_beta_rule([s.answer for s in val_samples],
                                               beta_rule) == "label-mean":
        raise VislensError(f"--betas {_show(betas)}: not used by the label-mean beta rule (on "
                           "yes/no data beta is the mean of the two labels' average "
                           "confidences); leave --betas out or pass --beta-rule grid")
    out = prepare_output_dir(out, force=force)
    job = dict(space=space, val_samples=val_samples, test_samples=test_samples, out=out,
               model=model, dataset=dataset, data_root=data_root, batch_size=batch_size,
               max_new_tokens=max_new_tokens, matcher=matcher, split_seed=split_seed,
               limit=limit, grid=grid, progress=progress, beta_rule=beta_rule,
               command=command if command is not None else shlex.join(sys.argv), log=log)
    if ray is not None:
        with open_session(ray, model, workers=workers, gpus_per_worker=gpus_per_worker,
                          dtype=dtype, device=device, log=log) as session:
            return _sweep_stages(session.pool, **job)
    if isinstance(model, (str, Path)):
        from .models import load_model

        return _sweep_stages(load_model(model, dtype=dtype, device=device), **job)
    return _sweep_stages(model, **job)


def _sweep_stages(adapter: Any, *, space: SweepGrid, val_samples: list, test_samples: list,
                  out: Path, model: Any, dataset: str, data_root: str | None, batch_size: int,
                  max_new_tokens: int, matcher: str, split_seed: int, limit: int | None,
                  grid: int, progress: bool, beta_rule: str, command: str,
                  log: Log) -> SweepResult:
    """Stages 1-3 of :func:`run_sweep` with a loaded adapter or a Ray worker pool."""
    from .capture import run_capture
    from .evaluate import evaluate_capture
    from .plots import dataset_label

    paths = {k: out / f for k, f in (("val_results", "val_results.csv"),
                                     ("val_scaling", "val_scaling.csv"),
                                     ("val_adaptvis", "val_adaptvis.csv"),
                                     ("val_curves", "val_curves.png"), ("chosen", "chosen.json"),
                                     ("test", "test.h5"), ("table1_csv", "table1.csv"),
                                     ("table1_md", "table1.md"))}
    seconds: dict[str, float] = {}

    log(f"[sweep 1/3] validation: {len(val_samples)} questions x {len(space.run_alphas)} alphas "
        f"({', '.join(f'{a:g}' for a in space.run_alphas)}), one prefill per batch")
    t0 = time.perf_counter()
    val = validation_pass(adapter, val_samples, space.run_alphas, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, matcher=matcher, progress=progress)
    choice = choose(val, space, beta_rule)
    seconds["validation"] = time.perf_counter() - t0
    val.to_frame().to_csv(paths["val_results"], index=False)
    choice.scaling.to_csv(paths["val_scaling"], index=False)
    choice.adaptvis.to_csv(paths["val_adaptvis"], index=False)
    name = getattr(adapter, "name", str(model))
    label = dataset_label(dataset)
    plot_curves(choice, paths["val_curves"],
                title=f"{label}: validation split ({len(val)} questions, {matcher} matcher)")
    conds = conditions_for_test(choice, space.baselines)
    meta = {"model": str(name), "dataset": dataset, "matcher": matcher, "split_seed": split_seed,
            "max_new_tokens": max_new_tokens, "limit": limit, "n_val": len(val_samples),
            "n_test": len(test_samples)}
    chosen = _chosen_record(choice, space, conds, **meta)
    paths["chosen"].write_text(json.dumps(chosen, indent=2) + "\n")
    s, a = chosen["scalingvis"], chosen["adaptvis"]
    log(f"[sweep 2/3] chosen on validation: ScalingVis alpha={s['alpha']:g} "
        f"({s['val_acc']:.1f}%), AdaptVis alpha1={a['alpha1']:g}, alpha2={a['alpha2']:g}, "
        f"beta={a['beta']:g} ({a['val_acc']:.1f}%); greedy {chosen['greedy']['val_acc']:.1f}% "
        f"[{seconds['validation']:.1f} s]")

    log(f"[sweep 3/3] test: {len(test_samples)} questions x {len(conds)} conditions -> "
        f"{paths['test']}")
    t0 = time.perf_counter()
    for stale in ("table1_csv", "table1_md"):  # never leave another run's table beside these
        paths[stale].unlink(missing_ok=True)
    try:
        summary = run_capture(model=adapter, dataset=dataset, data_root=data_root,
                              out=paths["test"], conditions=conds, split="test", limit=limit,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, grid=grid,
                              matcher=matcher, split_seed=split_seed, command=command,
                              progress=progress, log=log)
    except VislensError as exc:
        if "cannot resume" not in str(exc):
            raise
        raise VislensError(f"{exc} (a test capture of another sweep: delete {paths['test']} "
                           "or choose another --out)") from None
    if not summary.complete:
        raise VislensError(f"{summary.path}: test capture incomplete; run the sweep again to resume")
    tables = evaluate_capture(summary.path)
    acc = tables["accuracy"]
    acc = acc[acc["matcher"] == matcher].drop(columns="matcher")
    vsr = tables.get("vsr")
    vsr = vsr[vsr["matcher"] == matcher] if vsr is not None else None
    methods = {m: c for m, c in METHOD_CONDITIONS.items()
               if m in ("greedy", "scalingvis", "adaptvis") or m in space.baselines}
    spec_of = {name: spec for spec, name in map(_spec_and_name, conds)}
    specs = {m: spec_of[c] for m, c in methods.items()}
    table = table1_frame(acc, vsr, methods, specs)
    seconds["test"] = time.perf_counter() - t0
    table.to_csv(paths["table1_csv"])
    notes = [f"model: `{name}`; matcher: {matcher}; test split: {len(test_samples)} questions "
             f"(split seed {split_seed})",
             f"chosen on {len(val_samples)} validation questions: ScalingVis alpha={s['alpha']:g}; "
             f"AdaptVis alpha1={a['alpha1']:g}, alpha2={a['alpha2']:g}, beta={a['beta']:.4g}"
             + (" (the mean of the two labels' average confidences, the paper's yes/no rule)"
                if choice.beta_rule == "label-mean" else ""),
             f"dataset: `{dataset}`",
             "metrics in percent, accuracies with their 95% Wilson interval [low, high]; "
             "Δ = change against greedy decoding (percentage points)"]
    paths["table1_md"].write_text(table1_markdown(table, f"Table 1: {label}", notes))
    chosen["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    paths["chosen"].write_text(json.dumps(chosen, indent=2) + "\n")
    log(table1_markdown(table, f"Table 1: {label} (test)"))
    return SweepResult(out, space, choice, val, table, chosen, paths, seconds)


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``vislens sweep``'s flags to ``p`` (a subparser of the CLI or a fresh parser)."""
    from .jobs import add_job_arguments

    add_job_arguments(p, max_new_tokens=8, splits="each split")
    p.add_argument("--out", required=True, help="output folder")
    add_force_argument(p)
    p.add_argument("--alphas", default=DEFAULT_ALPHAS,
                   help=f"ScalingVis candidates, comma list; 1 is always added (default {DEFAULT_ALPHAS})")
    p.add_argument("--alpha1", default=DEFAULT_ALPHA1,
                   help=f"AdaptVis smoothing candidates (default {DEFAULT_ALPHA1})")
    p.add_argument("--alpha2", default=DEFAULT_ALPHA2,
                   help=f"AdaptVis sharpening candidates (default {DEFAULT_ALPHA2})")
    p.add_argument("--betas", default=None,
                   help=f"AdaptVis thresholds: start:stop:step (stop included) or a comma list "
                        f"(default {DEFAULT_BETAS})")
    p.add_argument("--beta-rule", default="auto", choices=BETA_RULES,
                   help="AdaptVis beta: grid search over --betas, or label-mean (the paper's "
                        "VSR rule: the mean of the yes and no samples' average confidences); "
                        "auto = label-mean on yes/no data, grid otherwise (default auto)")
    p.add_argument("--baselines", default="",
                   help=f"extra test-split baselines, comma list of {', '.join(BASELINES)}")
    p.set_defaults(func=run_args)
    return p


def run_args(args: argparse.Namespace) -> int:
    """Run a sweep from parsed :func:`add_arguments` flags; returns the exit status."""
    run_sweep(model=args.model, dataset=args.dataset, out=args.out, data_root=args.data_root,
              alphas=args.alphas, alpha1=args.alpha1, alpha2=args.alpha2, betas=args.betas,
              baselines=args.baselines, batch_size=args.batch_size,
              max_new_tokens=args.max_new_tokens, matcher=args.matcher,
              split_seed=args.split_seed, limit=args.limit, dtype=args.dtype,
              device=args.device, grid=args.grid, progress=not args.quiet, force=args.force,
              ray=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
              beta_rule=args.beta_rule,
              command="vislens sweep " + shlex.join(getattr(args, "_argv", sys.argv[2:])))
    print(f"outputs in {args.out}/ (table1.md, table1.csv, chosen.json, val_curves.png)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``vislens sweep ...``; raises :class:`VislensError` on bad input (the CLI prints it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_arguments(argparse.ArgumentParser(
        prog="vislens sweep", description="tune ScalingVis/AdaptVis on the validation split, "
        "compare methods on the test split"))
    from .io import unclaim_on_failure
    from .jobs import refuse_repeats

    args = refuse_repeats(parser).parse_args(argv)
    args._argv = argv
    with unclaim_on_failure():
        return run_args(args)


if __name__ == "__main__":  # python -m vislens.sweep --model ... --dataset ... --out ...
    try:
        sys.exit(main())
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        sys.exit(2)
