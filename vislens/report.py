"""``vislens report``: the per-layer AUROC report of a capture file.

Writes into ``OUT``:

- ``per_layer_auroc.csv``  condition, layer, auroc, n_pos, n_neg, auroc_low, auroc_high
  (overlap of the head-mean attention map with the object mask, as a score for answer
  correctness; a 95% bootstrap interval over samples);
- ``per_layer_auroc.png``  AUROC across layers per condition;
- ``roc_best_layers.png``  ROC curves at the paper's Figure 6 layers (17 and 18 of 32, at
  the same relative depth for other models; first condition);
- ``summary.csv``          per condition: accuracy, confidence, image-attention share,
  entropy, skewness, overlap, variance across layers;
- ``attention_by_layer.csv`` the same statistics per layer;
- ``attention_stats.csv``  condition, sample_id, layer, entropy, skewness: per sample and
  layer, Eq. 4 and Eq. 5 of each head's map averaged over heads;
- ``calibration.csv``      AUROC of confidence, attention sum and max at the paper's layer;
- ``report.md``            what a human reads first, tying them together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .analysis import (LayerStats, all_stats, attention_stats_table, calibration_table,
                       choose_layer, nanmean, paper_layer, PAPER_LAYERS,
                       per_layer_auroc_table, samples_note, summary_table)
from .errors import VislensError


def layer_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """Mean statistics per condition and layer (long format)."""
    frames = []
    for st in stats:
        share = st.image_mass / (st.image_mass + st.text_mass)
        df = pd.DataFrame({
            "condition": st.condition, "layer": np.arange(st.num_layers),
            "image_attention_share": nanmean(share, axis=0),
            "image_mass": st.image_mass.mean(axis=0), "entropy": nanmean(st.entropy, axis=0),
            "skewness": nanmean(st.skewness, axis=0),
        })
        if st.overlap is not None:
            df["overlap"] = nanmean(st.overlap, axis=0)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _mask_coverage(cap, stats: Sequence[LayerStats]) -> tuple[int, int, list[str]]:
    """``(samples with a non-empty box mask, samples analysed, why some have none)``.

    The reasons are the first few unmatched question objects ``vislens boxes`` recorded,
    e.g. ``'cat' (s3): no detection of class 'cat' above conf 0.25``.
    """
    mask = cap.box_mask()
    rows = np.unique(np.concatenate([st.rows for st in stats]))
    has = (mask[rows].reshape(len(rows), -1) > 0).any(axis=1)
    unmatched = cap.unmatched()
    reasons: list[str] = []
    if unmatched is not None and len(unmatched):
        without = unmatched[unmatched["row"].isin(rows[~has])]
        for r in without.drop_duplicates("reason").head(3).itertuples():
            reasons.append(f"'{r.label}' ({r.id}): {r.reason}")
    return int(has.sum()), len(rows), reasons


def auroc_lines(st: LayerStats, sub: pd.DataFrame) -> list[str]:
    """report.md lines for one condition: the validation-chosen layer's test AUROC, the
    maximum over layers (labelled optimistic) and every inverted layer (AUROC < 0.5)."""
    def ci(r) -> str:
        lo, hi = getattr(r, "auroc_low", np.nan), getattr(r, "auroc_high", np.nan)
        return f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else ""

    n_pos = int(sub["n_pos"].iloc[0]) if len(sub) else 0
    n_neg = int(sub["n_neg"].iloc[0]) if len(sub) else 0
    out = [f"- **{st.condition}** ({n_pos} correct / {n_neg} wrong)"]
    choice = choose_layer(st)
    if choice is not None:
        out.append(f"  - layer chosen on the validation split: **layer {choice.layer}** (validation "
                   f"AUROC {choice.val_auroc:.3f}, {choice.n_val} samples); test AUROC "
                   f"**{choice.test_auroc:.3f}** [{choice.test_low:.3f}, {choice.test_high:.3f}] "
                   f"({choice.n_test} test samples)")
    else:
        out.append("  - no validation-chosen layer: the capture needs validation and test samples "
                   "with both correct and wrong answers (capture with --split all)")
    defined = sub[np.isfinite(sub["auroc"])]
    if defined.empty:
        out.append("  - AUROC undefined at every layer (one class of answers)")
        return out
    top = defined.sort_values(["auroc", "layer"], ascending=[False, True]).iloc[0]
    out.append(f"  - maximum over layers (layer chosen and scored on the same samples, so "
               f"optimistic): layer {int(top.layer)}: {top.auroc:.3f}{ci(top)}")
    inverted = defined[defined["auroc"] < 0.5].sort_values("auroc")
    if len(inverted):
        def strong(r) -> bool:
            return bool(getattr(r, "auroc_high", np.nan) < 0.5)

        out.append("  - inverted layers (AUROC < 0.5: overlap is higher for wrong answers; "
                   "**bold** = strongly, the interval lies below 0.5): "
                   + ", ".join((f"**layer {int(r.layer)}: {r.auroc:.3f}**" if strong(r)
                                else f"layer {int(r.layer)}: {r.auroc:.3f}") + ci(r)
                               for r in inverted.itertuples()))
    return out


def write_report(path: str | Path, out_dir: str | Path, *, conditions: Sequence[str] | None = None,
                 chunk: int = 32, log: Callable[[str], None] | None = print) -> Path:
    """Compute the analysis of a capture and write the report files; returns ``report.md``.

    An unfinished capture is analysed on its done samples; the report header says so
    (``8 of 16 samples done (unfinished capture)``) and ``log`` gets the same line.
    """
    from . import plots
    from .evaluate import evaluate_capture, to_markdown
    from .store import open_capture

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = all_stats(path, conditions, chunk=chunk)
    with open_capture(path) as cap:
        attrs = dict(cap.attrs)
        has_boxes = cap.box_mask() is not None
        n_note = samples_note(cap)
        if not cap.complete and log is not None:
            log(f"{path}: {n_note}")
        covered, n_rows, reasons = _mask_coverage(cap, stats) if has_boxes else (0, 0, [])
    has_mask = covered > 0
    auroc = per_layer_auroc_table(stats, n_boot=1000)
    auroc.to_csv(out / "per_layer_auroc.csv", index=False)
    attention_stats_table(stats).to_csv(out / "attention_stats.csv", index=False)
    summary = summary_table(stats)
    summary.to_csv(out / "summary.csv", index=False)
    by_layer = layer_table(stats)
    by_layer.to_csv(out / "attention_by_layer.csv", index=False)
    n_layers = stats[0].num_layers
    roc_layers = sorted({paper_layer(x, n_layers) for x in PAPER_LAYERS[6]}) if has_mask else []
    calib_layer = paper_layer(PAPER_LAYERS[18][0], n_layers)
    calib = calibration_table(stats, calib_layer)
    calib.to_csv(out / "calibration.csv", index=False)
    figures: list[str] = []
    notes: list[str] = []
    if has_mask and auroc["auroc"].notna().any():
        fig = plots.plot_layer_auroc(auroc)
        fig.savefig(out / "per_layer_auroc.png", dpi=150, bbox_inches="tight")
        figures.append("per_layer_auroc.png")
        try:
            fig = plots.plot_roc_layers(stats[0], roc_layers)
            fig.savefig(out / "roc_best_layers.png", dpi=150, bbox_inches="tight")
            figures.append("roc_best_layers.png")
        except VislensError as exc:  # e.g. one class of answers in the first condition
            notes.append(f"roc_best_layers.png not drawn: {str(exc).splitlines()[0]}")
    try:
        acc = evaluate_capture(path, log=None)["accuracy"]
        acc = acc[acc["matcher"] == attrs.get("matcher", "paper")].drop(columns="matcher")
        acc = acc[acc.index.isin([st.condition for st in stats])]  # only the asked conditions
    except VislensError:
        acc = None

    lines = [f"# vislens report: `{Path(path).name}`", "",
             f"- model: `{attrs.get('model', '?')}`; dataset: "
             f"{plots.dataset_label(attrs.get('dataset', ''), path)} "
             f"(`{attrs.get('dataset', '') or '?'}`); "
             f"{n_note}; {attrs.get('num_layers')} layers x {attrs.get('num_heads')} heads; "
             f"grid {np.asarray(attrs.get('grid', [0])).ravel()[0]}x{np.asarray(attrs.get('grid', [0])).ravel()[0]}",
             f"- conditions: {', '.join(st.condition for st in stats)}", ""]
    if acc is not None:
        lines += ["## Accuracy", "", to_markdown(acc), ""]
    lines += ["## Where the answer position looks", "",
              "Overlap = cosine similarity of the head-mean attention map with the mask of the "
              "question's objects; AUROC = how well that overlap separates correct from wrong "
              "answers (undefined with only one class: shown as nan).", ""]
    if not has_boxes:
        lines += ["No box mask in this capture: run `vislens boxes FILE --detector annotations` "
                  "(or `--detector yolo --weights PATH`) to get the per-layer AUROC.", ""]
    elif not has_mask:
        lines += [f"The capture has boxes, but none of the {n_rows} analysed samples has a box "
                  f"for its question objects, so overlap and AUROC are undefined"
                  + (": " + "; ".join(reasons) if reasons else "") + ".",
                  "To fix: rerun `vislens boxes FILE` with `--detector annotations` if the "
                  "dataset has object boxes, or with `--detector yolo --weights PATH` using a "
                  "detector that knows these objects (or a lower `--conf`).", ""]
    else:
        if covered < n_rows:
            lines += [f"Overlap and AUROC use the {covered} of {n_rows} samples with a box for "
                      f"their question objects" + (" (without: " + "; ".join(reasons) + ")"
                                                   if reasons else "") + ".", ""]
        for st in stats:
            lines += auroc_lines(st, auroc[auroc["condition"] == st.condition])
        lines.append("")
    lines += ["## Attention statistics (mean over samples and layers)", "",
              to_markdown(summary.set_index("condition"), floatfmt=".3f"), "",
              f"## Calibration at layer {calib_layer}", "",
              f"AUROC of each signal for answer correctness (Figure 18), at layer {calib_layer}: "
              f"the paper's layer {PAPER_LAYERS[18][0]} of 32 at this model's relative depth.", "",
              to_markdown(calib.set_index("condition"), floatfmt=".3f"), ""]
    if figures or notes:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + notes + [""]
    lines += ["Files: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
