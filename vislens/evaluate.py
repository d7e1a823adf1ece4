"""Answer matching and accuracy tables for the spatial-reasoning benchmarks.

Two families of answer matchers:

- the paper's rules (:func:`match_paper`, :func:`match_vsr_paper`), reproduced exactly,
  quirks included, so numbers are comparable with the published tables;
- a strict rule (:func:`match_first_word`) that only accepts the generation's first word.

Percentages: :func:`accuracy` returns a fraction in [0, 1] (like scikit-learn); the
table-style outputs (:func:`pair_set_accuracy`, :func:`accuracy_table`) report
percentages, as the paper's tables do, in columns ending in ``acc``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .errors import VislensError
from .metrics import wilson_interval

if TYPE_CHECKING:
    from .store import Capture

__all__ = [
    "accuracy",
    "accuracy_table",
    "gold_frequency",
    "inference_time",
    "match_first_word",
    "match_paper",
    "match_vsr_paper",
    "pair_set_accuracy",
    "to_markdown",
    "vsr_scores",
]

_WORD = re.compile(r"[^\W\d_]+")  # a run of letters (any script): punctuation/digits split words

# The two relation pairs of each What'sUp subset; "left"/"right" is in both.
_SUBSET_PAIRS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "a": (("left", "right"), ("on", "under")),
    "b": (("left", "right"), ("front", "behind")),
}


# --------------------------------------------------------------------------- matchers


def is_yes_no(values: "Sequence[str] | pd.Series") -> bool:
    """True when every value (gold answers, or a sample's options) is yes or no, any case:
    VSR-style data, matched by the paper's Yes/No rule and scored with F1."""
    labels = {str(a).strip().lower() for a in values}
    return bool(labels) and labels <= {"yes", "no"}


def match_paper(generation: str, gold: str) -> bool:
    """The paper's What'sUp rule: case-insensitive substring, except "front" never means On.

    Exactly ``(gold in gen or gold.lower() in gen.lower()) and not (gold.lower() == 'on'
    and 'front' in gen.strip().lower())``. Being a substring test it is lenient: "one"
    matches On and "bright" matches Right; and "in front" does not match On.
    """
    return (gold in generation or gold.lower() in generation.lower()) and not (
        gold.lower() == "on" and "front" in generation.strip().lower()
    )


def _first_word(text: str) -> str | None:
    """Lower-cased first alphabetic word; a leading "in front" counts as "front"."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] == "in" and len(words) > 1 and words[1] == "front":
        return "front"
    return words[0]


def match_first_word(generation: str, gold: str) -> bool:
    """Strict rule: the generation's first alphabetic word equals the gold's first word.

    Case-insensitive; punctuation and digits separate words ("Left." -> "left"). A leading
    "in front (of)" reads as "front", so "in front of" and "Front" both match gold Front.
    Otherwise only the first word counts: "on top of" matches On, not Top; "bright" does
    not match Right; "The answer is left" does not match Left.
    """
    g = _first_word(gold)
    if g is None:
        raise VislensError(f"gold answer {gold!r} has no alphabetic word")
    return _first_word(generation) == g


def match_vsr_paper(generation: str, label: int) -> bool:
    """The paper's VSR rule, case-sensitive: label 1 is correct iff ``'Yes' in gen``,
    label 0 iff ``'No' in gen`` (so "yes" never matches, and "None" counts as No)."""
    if label not in (0, 1):
        raise VislensError(f"VSR label must be 0 or 1, got {label!r}")
    return ("Yes" in generation) if int(label) == 1 else ("No" in generation)


# --------------------------------------------------------------------------- accuracy


def _bool_array(values: np.ndarray | Sequence[bool], name: str = "correct") -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.size == 0:
        return arr.astype(bool)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
        raise VislensError(f"{name}: expected bool or 0/1 values")
    return arr.astype(bool)


def accuracy(correct: np.ndarray | Sequence[bool]) -> float:
    """Fraction of correct answers in [0, 1]; NaN for an empty selection."""
    c = _bool_array(correct)
    return float(c.mean()) if c.size else float("nan")


def _canonical_relation(rel: str) -> str:
    word = _first_word(str(rel))
    if word is None:
        raise VislensError(f"relation {rel!r} has no alphabetic word")
    return word


def pair_set_accuracy(
    relations: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    subset: Literal["a", "b"],
    *,
    paper_denominators: bool = False,
) -> dict[str, float]:
    """What'sUp pair and set accuracy (percent) over groups of one subject/object pair.

    Each group (same subject, object and image set) asks about up to four relations.
    Subset ``"a"`` pairs {left, right} and {on, under}; subset ``"b"`` pairs {left, right}
    and {front, behind}. A *pair* is correct when both of its relations are answered
    correctly; a *set* when all four are. Relation names are matched on their first word
    ("left of" = left, "in front of" = front).

    Denominators:

    - default (vislens): the number of *complete* pairs/sets present, so a subsample or a
      group with a missing question neither helps nor hurts:
      ``pair_acc = 100 * pair_correct / n_pairs``, ``set_acc = 100 * set_correct / n_sets``;
    - ``paper_denominators=True``: ``N / 2`` and ``N / 4`` with ``N`` the number of
      questions, as the paper's code does. Equal to the default on the full benchmark, but
      biased low on a subsample where some pairs/sets are incomplete.

    Returns ``pair_acc``, ``set_acc`` (NaN when the denominator is 0), ``pair_correct``,
    ``set_correct``, ``n_pairs``, ``n_sets`` (the denominators actually used).
    """
    if subset not in _SUBSET_PAIRS:
        raise VislensError(f"subset: expected 'a' or 'b', got {subset!r}")
    rel = [_canonical_relation(r) for r in np.asarray(relations, dtype=object).ravel()]
    grp = np.asarray(groups, dtype=object).ravel()
    cor = _bool_array(np.asarray(correct).ravel())
    if not (len(rel) == len(grp) == len(cor)):
        raise VislensError(
            f"relations, groups and correct differ in length: {len(rel)}, {len(grp)}, {len(cor)}"
        )
    pairs = _SUBSET_PAIRS[subset]
    allowed = {r for pair in pairs for r in pair}
    by_group: dict[object, dict[str, bool]] = {}
    for r, g, c in zip(rel, grp, cor):
        if r not in allowed:
            raise VislensError(f"relation {r!r} is not in subset {subset!r} ({sorted(allowed)})")
        answers = by_group.setdefault(g, {})
        if r in answers:
            raise VislensError(f"group {g!r} has relation {r!r} more than once")
        answers[r] = bool(c)

    pair_correct = n_pairs = set_correct = n_sets = 0
    for answers in by_group.values():
        for pair in pairs:
            if all(r in answers for r in pair):
                n_pairs += 1
                pair_correct += all(answers[r] for r in pair)
        if len(answers) == len(allowed):
            n_sets += 1
            set_correct += all(answers.values())

    n = len(rel)
    den_pair: float = n / 2 if paper_denominators else n_pairs
    den_set: float = n / 4 if paper_denominators else n_sets
    return {
        "pair_acc": 100.0 * pair_correct / den_pair if den_pair else float("nan"),
        "set_acc": 100.0 * set_correct / den_set if den_set else float("nan"),
        "pair_correct": pair_correct,
        "set_correct": set_correct,
        "n_pairs": den_pair,
        "n_sets": den_set,
    }


def vsr_scores(pred_yes: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Accuracy, precision/recall/F1 and the paper's F1 variant for VSR yes/no answers.

    Standard metrics (scikit-learn, positive class = label 1 "yes"): ``precision`` =
    TP/(TP+FP), ``recall`` = TP/(TP+FN), ``f1`` their harmonic mean.

    The paper's code reports different quantities under the same names; here they are
    ``precision_paper`` = TP/(TP+FN) (really the recall / true-positive rate),
    ``recall_paper`` = TN/(TN+FP) (really the specificity / true-negative rate) and
    ``f1_paper`` = their harmonic mean (a balanced-accuracy-like score, not an F1). Also
    returns the counts ``tp``, ``fn``, ``tn``, ``fp``. Undefined ratios are NaN.
    """
    pred = _bool_array(np.asarray(pred_yes).ravel(), "pred_yes")
    y = _bool_array(np.asarray(label).ravel(), "label")
    if pred.shape != y.shape:
        raise VislensError(f"pred_yes {pred.shape} and label {y.shape} differ in shape")
    if y.size == 0:
        raise VislensError("vsr_scores: no samples")
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[False, True])
    p, r, f, _ = precision_recall_fscore_support(
        y, pred, labels=[True], average=None, zero_division=np.nan
    )

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    p_paper = ratio(tp, tp + fn)
    r_paper = ratio(tn, tn + fp)
    if math.isnan(p_paper) or math.isnan(r_paper):
        f_paper = float("nan")
    else:
        f_paper = ratio(2 * p_paper * r_paper, p_paper + r_paper)
    return {
        "accuracy": float(np.mean(pred == y)),
        "precision": float(p[0]),
        "recall": float(r[0]),
        "f1": float(f[0]),
        "precision_paper": float(p_paper),
        "recall_paper": float(r_paper),
        "f1_paper": float(f_paper),
        "tp": int(tp),
        "fn": int(fn),
        "tn": int(tn),
        "fp": int(fp),
    }


# --------------------------------------------------------------------------- tables


def accuracy_table(
    df: pd.DataFrame,
    by: Sequence[str] = ("condition",),
    *,
    columns: str | None = "relation",
    pair_set: Literal["a", "b"] | None = None,
    paper_denominators: bool = False,
    intervals: bool = False,
) -> pd.DataFrame:
    """Accuracy (percent) per row key and per relation, like the paper's tables.

    With ``intervals=True`` every accuracy column ``X`` is followed by ``X_low`` and
    ``X_high``, its Wilson 95% interval in percent (:func:`vislens.metrics.wilson_interval`;
    pair/set accuracy over the pairs/sets counted, NaN with ``paper_denominators`` when
    ``N/2`` or ``N/4`` is not whole). :func:`to_markdown` shows them as ``X [low, high]``.

    ``df`` is tidy: one row per question with the ``by`` columns (default ``condition``),
    ``relation`` and a bool ``correct`` (plus ``group`` when ``pair_set`` is given). Returns
    one row per ``by`` value (first-appearance order) with columns ``n`` (questions),
    one accuracy per ``columns`` value (first-appearance order; omitted when
    ``columns=None``), ``acc`` (over all questions) and, with ``pair_set="a"|"b"``,
    ``pair_acc`` and ``set_acc`` from :func:`pair_set_accuracy`.
    """
    by = [by] if isinstance(by, str) else list(by)
    needed = set(by) | {"correct"}
    if columns is not None:
        needed.add(columns)
    if pair_set is not None:
        needed |= {"relation", "group"}
    missing = sorted(needed - set(df.columns))
    if missing:
        raise VislensError(f"accuracy_table: missing column(s) {missing}")
    if not by:
        raise VislensError("accuracy_table: 'by' must name at least one column")

    col_values = list(pd.unique(df[columns])) if columns is not None else []
    rows = []

    def wilson(row: dict, name: object, k: float, n: float) -> None:
        if intervals:
            whole = float(n).is_integer() and float(k).is_integer()
            lo, hi = wilson_interval(int(k), int(n)) if whole else (np.nan, np.nan)
            row[f"{name}_low"], row[f"{name}_high"] = 100.0 * lo, 100.0 * hi

    for key, part in df.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        correct = _bool_array(part["correct"].to_numpy())
        row: dict[object, object] = dict(zip(by, key))
        row["n"] = len(part)
        for v in col_values:
            sel = (part[columns] == v).to_numpy()
            row[v] = 100.0 * accuracy(correct[sel])
            wilson(row, v, correct[sel].sum(), sel.sum())
        row["acc"] = 100.0 * accuracy(correct)
        wilson(row, "acc", correct.sum(), correct.size)
        if pair_set is not None:
            ps = pair_set_accuracy(
                part["relation"].to_numpy(),
                part["group"].to_numpy(),
                correct,
                pair_set,
                paper_denominators=paper_denominators,
            )
            row["pair_acc"] = ps["pair_acc"]
            wilson(row, "pair_acc", ps["pair_correct"], ps["n_pairs"])
            row["set_acc"] = ps["set_acc"]
            wilson(row, "set_acc", ps["set_correct"], ps["n_sets"])
        rows.append(row)
    accs = [*col_values, "acc"] + (["pair_acc", "set_acc"] if pair_set else [])
    order = [*by, "n"] + [c for a in accs
                          for c in ([a, f"{a}_low", f"{a}_high"] if intervals else [a])]
    return pd.DataFrame(rows, columns=order).set_index(by)


def _cell(value: object, floatfmt: str) -> str:
    if isinstance(value, (float, np.floating)):
        text = "nan" if np.isnan(value) else format(value, floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _merge_intervals(df: pd.DataFrame, floatfmt: str) -> tuple[pd.DataFrame, list]:
    """Columns ``X, X_low, X_high`` -> one text column ``X`` reading ``v [lo, hi]``; also
    returns the merged column labels."""
    cols = [c for c in df.columns if isinstance(c, str) or not isinstance(c, tuple)]
    names = {str(c): c for c in cols}
    merged = [c for c in cols if f"{c}_low" in names and f"{c}_high" in names
              and all(pd.api.types.is_numeric_dtype(df[x]) for x in (c, names[f"{c}_low"],
                                                                     names[f"{c}_high"]))]
    if not merged:
        return df, []
    out = df.copy()
    for c in merged:
        lo, hi = df[names[f"{c}_low"]], df[names[f"{c}_high"]]
        out[c] = [_cell(v, floatfmt) + (f" [{_cell(a, floatfmt)}, {_cell(b, floatfmt)}]"
                                         if np.isfinite(a) and np.isfinite(b) else "")
                  for v, a, b in zip(df[c], lo, hi)]
        out = out.drop(columns=[names[f"{c}_low"], names[f"{c}_high"]])
    return out, merged


def to_markdown(df: pd.DataFrame, *, floatfmt: str = ".1f", index: bool | None = None) -> str:
    """Render ``df`` as a GitHub pipe table without the optional ``tabulate`` package.

    Floats use ``floatfmt`` (NaN prints as ``nan``); numeric columns are right-aligned;
    ``|`` in cells is escaped. ``index=None`` includes the index unless it is a default
    ``RangeIndex``. MultiIndex levels become separate columns; MultiIndex column labels are
    joined with ``" / "``. A column ``X`` followed by numeric ``X_low`` and ``X_high`` (an
    interval) is shown as one column, ``X [low, high]``.
    """
    df, merged = _merge_intervals(df, floatfmt)
    frame = df
    if index is None:
        index = not (isinstance(df.index, pd.RangeIndex) and df.index.name is None)
    if index:
        names = [n if n is not None else "" for n in df.index.names]
        frame = df.reset_index(names=[n or f"level_{i}" for i, n in enumerate(names)])
        header_override = {i: n for i, n in enumerate(names)}
    else:
        header_override = {}

    def label(c: object) -> str:
        return " / ".join(map(str, c)) if isinstance(c, tuple) else str(c)

    headers = [header_override.get(i, label(c)) for i, c in enumerate(frame.columns)]
    numeric = [
        (pd.api.types.is_numeric_dtype(frame.iloc[:, i]) and not pd.api.types.is_bool_dtype(frame.iloc[:, i]))
        or frame.columns[i] in merged
        for i in range(frame.shape[1])
    ]
    body = [[_cell(v, floatfmt) for v in row] for row in frame.itertuples(index=False, name=None)]
    lines = [
        "| " + " | ".join(_cell(h, floatfmt) for h in headers) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- capture files

def _subset_of(relations: pd.Series) -> str | None:
    """Controlled-style subset ("a": on/under, "b": front/behind) from the gold relations."""
    rel = {_canonical_relation(r) for r in relations.dropna().unique() if r}
    if rel and rel <= {"left", "right", "on", "under"} and rel & {"on", "under"}:
        return "a"
    if rel and rel <= {"left", "right", "front", "behind"} and rel & {"front", "behind"}:
        return "b"
    return None


def gold_frequency(samples: pd.DataFrame) -> pd.DataFrame:
    """Table 7: how often each gold answer occurs, per relation.

    ``samples`` has one row per question with ``relation`` and ``answer``. Returns one row
    per (relation, answer) in first-appearance order with ``n``, ``percent`` (of all
    questions) and ``percent_of_relation`` (of the relation's questions): a benchmark whose
    gold answers are unbalanced rewards a model that always gives the frequent one.
    """
    missing = sorted({"relation", "answer"} - set(samples.columns))
    if missing:
        raise VislensError(f"gold_frequency: missing column(s) {missing}")
    if samples.empty:
        raise VislensError("gold_frequency: no samples")
    counts = samples.groupby(["relation", "answer"], sort=False).size().rename("n").reset_index()
    per_rel = counts.groupby("relation", sort=False)["n"].transform("sum")
    counts["percent"] = 100.0 * counts["n"] / counts["n"].sum()
    counts["percent_of_relation"] = 100.0 * counts["n"] / per_rel
    return counts.set_index(["relation", "answer"])


def inference_time(cap: "Capture") -> pd.DataFrame:
    """Table 9: inference time per method relative to greedy decoding (the baseline).

    One row per condition (index) with ``method``, ``n`` (done samples),
    ``seconds_per_sample`` (mean of the stored ``compute_seconds``: what the condition
    would cost run alone, see ``docs/capture-format.md``) and ``ratio`` to the baseline
    condition's (NaN without a baseline). A version-1 capture has no times: one-line
    VislensError.
    """
    from .plots import baseline_condition

    rows = []
    for name in cap.conditions:
        sec = cap.compute_seconds(name)
        ok = np.isfinite(sec)
        rows.append({"condition": name, "method": cap.condition_attrs(name).get("method", ""),
                     "n": int(ok.sum()),
                     "seconds_per_sample": float(sec[ok].mean()) if ok.any() else float("nan")})
    df = pd.DataFrame(rows).set_index("condition")
    try:
        ref = df.loc[baseline_condition(cap), "seconds_per_sample"]
    except VislensError:
        ref = float("nan")
    df["ratio"] = df["seconds_per_sample"] / ref if ref > 0 else float("nan")
    return df


def evaluate_capture(path: str | Path, out_dir: str | Path | None = None, *,
                     log: Callable[[str], None] | None = print) -> dict[str, pd.DataFrame]:
    """Accuracy tables of a capture file under both answer matchers.

    Per condition and per gold relation, each with its Wilson 95% interval; pair and set
    accuracy when the samples form complete Controlled-style groups; VSR-style yes/no data
    adds standard F1 and the paper's variant (an answer the matcher accepts as neither yes nor
    no is wrong: FN for a true caption, FP for a false one); ``gold_frequency`` is Table 7 (how often each
    gold answer occurs per relation); ``inference_time`` is Table 9 (seconds per sample and
    ratio to greedy per condition; a version-1 capture has no times and ``log`` gets one
    line saying so). Writes ``accuracy.csv``, ``gold_frequency.csv`` (and ``vsr.csv``,
    ``inference_time.csv``) into ``out_dir`` when given. On an unfinished capture the tables cover the
    done samples and ``log`` gets one line saying so
    (``c.h5: 8 of 16 samples done (unfinished capture)``).
    """
    from .analysis import samples_note
    from .store import open_capture

    with open_capture(path) as cap:
        tab = cap.table()
        if not cap.complete and log is not None:
            log(f"{path}: {samples_note(cap)}")
        try:
            times: pd.DataFrame | None = inference_time(cap)
        except VislensError as exc:
            times = None
            if log is not None:
                log(f"Table 9 (inference time) skipped: {exc}")
    if tab.empty:
        raise VislensError(f"{path}: no completed samples to evaluate")
    tables: dict[str, pd.DataFrame] = {}
    subset = _subset_of(tab["relation"]) if "group" in tab and tab["group"].astype(bool).all() else None
    rows = []
    for matcher, fn in (("paper", match_paper), ("first-word", match_first_word)):
        t = tab.copy()
        yesno = is_yes_no(t["answer"])
        if yesno and matcher == "paper":
            t["correct"] = [match_vsr_paper(p, int(a.lower() == "yes"))
                            for p, a in zip(t["prediction"], t["answer"])]
        else:
            t["correct"] = [fn(p, a) for p, a in zip(t["prediction"], t["answer"])]
        acc = accuracy_table(t, by=("condition",), pair_set=subset, intervals=True)
        acc.insert(0, "matcher", matcher)
        rows.append(acc)
        if yesno:
            vs = []
            for cond, g in t.groupby("condition", sort=False):
                # the decision each answer counts as, from the matcher's correctness: an
                # answer that is neither yes nor no is wrong either way (FN for a true
                # caption, FP for a false one, as the paper's code counts it), so the VSR
                # accuracy equals the accuracy table's
                label = (g["answer"].str.lower() == "yes").to_numpy()
                pred_yes = g["correct"].to_numpy(bool) == label
                vs.append({"matcher": matcher, "condition": cond, **vsr_scores(pred_yes, label)})
            tables.setdefault("vsr", pd.DataFrame())
            tables["vsr"] = pd.concat([tables["vsr"], pd.DataFrame(vs)], ignore_index=True)
    tables["accuracy"] = pd.concat(rows)
    tables["gold_frequency"] = gold_frequency(tab.drop_duplicates("row"))
    if times is not None:
        tables["inference_time"] = times
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, df in tables.items():
            # a table's index is written when it means something (condition, relation...),
            # never pandas' plain row numbers
            df.to_csv(out / f"{name}.csv", index=not isinstance(df.index, pd.RangeIndex))
    return tables
