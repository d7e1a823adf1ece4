"""The paper's figures, one function per figure, from a capture file or precomputed stats.

Every function takes a :class:`~vislens.store.Capture` (or a path to one; some also take
:class:`~vislens.analysis.LayerStats` or a results table) and returns a
:class:`matplotlib.figure.Figure` built without pyplot (nothing is shown, nothing leaks into
pyplot's figure list; save it with ``fig.savefig`` or display it in a notebook). All figures
share one style (:func:`vislens_style`) and colour maps that read in greyscale (viridis /
cividis, plus markers and line styles for categorical series).

When a capture lacks what a figure needs (no ``add`` conditions, no box mask, only one
class so an AUROC is undefined, ...) the function raises a one-line
:class:`~vislens.errors.VislensError` naming what is missing;
:func:`vislens.figures.write_figures` skips that figure and writes the rest.

===========================  ==========  ===========================================
function                     paper       needs
===========================  ==========  ===========================================
:func:`attention_share`      Figure 3    image/text attention masses (token counts optional)
:func:`add_constant_accuracy`  Figure 4  conditions with method ``add``
:func:`attention_heatmaps`   Figure 5    attention; boxes and images optional
:func:`overlap_roc`          Figure 6    box mask, both correct and incorrect answers
:func:`variance_and_auroc`   Figure 7    attention; box mask for the AUROC panel
:func:`scaling_sweep`        Figure 8    conditions with method ``scaling``
:func:`before_after`         Figs 9, 10  a ``scaling`` condition with alpha < 1 / > 1
:func:`subset_entropy_skewness`  Fig. 14  attention, one capture per subset
:func:`entropy_skewness`     (Fig. 14)   the same per condition of one capture
:func:`relation_familiarity`  Fig. 15    gold relations, one capture per subset
:func:`confidence_by_relation`  (15)     confidence box plots of one capture
:func:`attention_logit_distribution`  Fig. 26  image logits (capture format 2), scaling
:func:`log_attention_distribution`  (26)  centred log weights (any capture)
===========================  ==========  ===========================================
"""
from __future__ import annotations

import functools
import math
import os
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from . import metrics
from .conditions import condition_label as _condition_label
from .conditions import format_ranges as _ranges
from .data.base import IMAGE_FORMATS
from .errors import VislensError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .analysis import LayerStats
    from .store import Capture

__all__ = [
    "CMAP",
    "accuracy_interval",
    "add_constant_accuracy",
    "attention_heatmaps",
    "attention_share",
    "baseline_condition",
    "before_after",
    "best_layers",
    "cell_variance",
    "centred_log_attention",
    "capture_label",
    "check_layer",
    "condition_label",
    "confidence_by_relation",
    "dataset_label",
    "default_layer",
    "entropy_skewness",
    "log_attention_distribution",
    "attention_logit_distribution",
    "overlap_roc",
    "pick_examples",
    "plot_layer_auroc",
    "plot_roc_layers",
    "relation_familiarity",
    "relation_group",
    "read_phrase_stats",
    "scaling_condition",
    "scaling_sweep",
    "subset_entropy_skewness",
    "subset_labels",
    "token_counts",
    "variance_and_auroc",
    "vislens_style",
]

Source = Union["Capture", str, os.PathLike]

#: sequential colour map of every heatmap (perceptually uniform, monotone in lightness)
CMAP = "viridis"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
_LINESTYLES = ("-", "--", "-.", ":")
_OUTCOMES = ("correct", "incorrect")


# ----------------------------------------------------------------------------- style


def _rc() -> dict[str, Any]:
    import seaborn as sns
    from cycler import cycler

    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.15))
    rc.update({
        "image.cmap": CMAP,
        "axes.prop_cycle": cycler(color=_series_colors(6)),
        "axes.titlesize": 10,
        "axes.titleweight": "normal",
        "figure.titlesize": 12,
        "legend.frameon": True,
        "legend.framealpha": 0.85,
        "legend.fontsize": 8.5,
        "grid.linewidth": 0.6,
        "lines.linewidth": 1.8,
        "lines.markersize": 5.5,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "figure.dpi": 100,
        "font.family": "sans-serif",
    })
    return rc


@contextmanager
def vislens_style() -> Iterator[None]:
    """The one vislens plotting style (seaborn ``whitegrid`` / ``paper`` + vislens colours).

    Every plot function builds its figure inside it; wrap ``fig.savefig`` in it too when
    saving yourself (:func:`vislens.figures.save_figure` does).
    """
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        yield


def _styled(fn: Callable[..., "Figure"]) -> Callable[..., "Figure"]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> "Figure":
        with vislens_style():
            return fn(*args, **kwargs)

    return wrapper


def _series_colors(n: int) -> list[Any]:
    """``n`` categorical colours sampled from viridis (distinct lightness, greyscale-safe)."""
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    if n <= 1:
        return [cmap(0.25)]
    return [cmap(x) for x in np.linspace(0.0, 0.85, n)]


def _outcome_palette() -> dict[str, Any]:
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    return {"correct": cmap(0.72), "incorrect": cmap(0.08)}


@contextmanager
def _quiet_seaborn() -> Iterator[None]:
    """Silence seaborn 0.13's use of matplotlib APIs deprecated in 3.11 (``vert=``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*vert: bool was deprecated",
                                category=DeprecationWarning)
        yield


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _footer(fig: "Figure", text: str) -> None:
    """Small grey provenance line under the figure (kept by ``bbox_inches="tight"``)."""
    fig.text(0.0, -0.01, text, fontsize=7, color="0.4", ha="left", va="top")


def _integer_layers(*axes: "Axes") -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _style_key(i: int) -> dict[str, Any]:
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINESTYLES[(i // 3) % len(_LINESTYLES)]}


#: margin (percentage points) below 0% and above 100% on percentage axes, so lines and
#: boxes at the limits stay visible instead of hiding under the frame
PCT_PAD = 4.0


def _pct_axis(ax: "Axes", top: float = 100.0) -> None:
    """A 0..``top`` % y axis with :data:`PCT_PAD` of room at both ends."""
    ax.set_ylim(-PCT_PAD, top + PCT_PAD)


def accuracy_interval(correct: Any) -> tuple[float, float, float, int]:
    """``(accuracy %, low %, high %, n)`` of a boolean vector: the 95% Wilson interval
    (:func:`vislens.metrics.wilson_interval`); NaNs when ``n == 0``."""
    c = np.asarray(correct, dtype=bool)
    n = int(c.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    lo, hi = metrics.wilson_interval(int(c.sum()), n)
    return 100.0 * float(c.mean()), 100.0 * lo, 100.0 * hi, n


def _acc_text(acc: tuple[float, float, float, int]) -> str:
    """``62% [55-69]`` (95% Wilson interval)."""
    return f"{acc[0]:.0f}% [{acc[1]:.0f}-{acc[2]:.0f}]"


#: readable names of the paper's subsets, by the name vislens gives them
SUBSET_NAMES = {"controlled_a": "Controlled_A", "controlled_b": "Controlled_B",
                "coco_one": "COCO_one", "coco_two": "COCO_two"}


def dataset_label(spec: Any, path: str | os.PathLike | None = None) -> str:
    """A short readable name of a capture's ``dataset`` attr for titles and legends.

    ``whatsup:controlled_a`` and ``jsonl:.../controlled_a.jsonl`` -> ``Controlled_A``;
    ``vsr:test`` -> ``VSR test``; another ``jsonl:PATH`` -> the file's stem; an empty attr
    -> the capture file's stem (``path``), else ``capture``. Never a raw ``jsonl:/path``.
    """
    text = str(spec or "").strip()
    if text.startswith("jsonl:"):
        text = Path(text[len("jsonl:"):]).stem
    elif text.startswith("vsr:"):
        return f"VSR {text[len('vsr:'):]}"
    elif ":" in text:
        text = text.split(":", 1)[1]
    if not text:
        return Path(path).stem if path else "capture"
    return SUBSET_NAMES.get(text.lower(), text)


def capture_label(cap: "Capture") -> str:
    """:func:`dataset_label` of an open capture."""
    return dataset_label(cap.attrs.get("dataset", ""), cap.path)


def _provenance(cap: "Capture") -> str:
    """``data: Controlled_A; model: llava`` for footers."""
    return f"data: {capture_label(cap)}; model: {cap.attrs.get('model', '')}"


# ----------------------------------------------------------------------------- sources


@contextmanager
def _capture(source: Source) -> Iterator["Capture"]:
    """Yield an open capture; open (and close afterwards) when given a path."""
    from .store import Capture, open_capture

    if isinstance(source, Capture):
        yield source
        return
    if isinstance(source, (str, os.PathLike)):
        cap = open_capture(source)
        try:
            yield cap
        finally:
            cap.close()
        return
    raise VislensError(f"expected a Capture or a capture file path, got {type(source).__name__}")


def baseline_condition(cap: "Capture") -> str:
    """Name of the capture's baseline condition (``"baseline"``, else the first of method baseline)."""
    if "baseline" in cap.conditions:
        return "baseline"
    for name in cap.conditions:
        if cap.condition_attrs(name).get("method") == "baseline":
            return name
    raise VislensError(f"{cap.path}: no baseline condition (capture with --condition baseline)")


def _methods(cap: "Capture", method: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name in cap.conditions:
        attrs = cap.condition_attrs(name)
        if attrs.get("method") == method:
            out.append((name, attrs))
    return out


def condition_label(name: str, attrs: Mapping[str, Any] | None = None) -> str:
    """Human label of a condition from its attrs, e.g. ``ScalingVis α=0.5``, ``add δ=-1``
    (each method labels itself: :func:`vislens.conditions.condition_label`)."""
    return _condition_label(name, attrs)


def _label(cap: "Capture", name: str) -> str:
    return condition_label(name, cap.condition_attrs(name))


def _num_layers(cap: "Capture") -> int:
    return int(cap.attrs["num_layers"])


def _grid(cap: "Capture") -> int:
    g = cap.attrs.get("grid")
    return int(np.atleast_1d(g)[0])


def check_layer(layer: int, n_layers: int, where: Any, name: str = "layer") -> int:
    """``layer`` as a non-negative index (negative counts from the end), or a one-line error
    naming ``where`` and ``name`` (e.g. the ``--layer`` flag) with the value given."""
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise VislensError(f"{where}: {name} must be an integer, got {layer!r}")
    given = int(layer)
    layer = given + n_layers if given < 0 else given
    if not 0 <= layer < n_layers:
        raise VislensError(f"{where}: {name} {given} out of range (the capture has {n_layers} "
                           f"layers, 0-{n_layers - 1}, or -{n_layers} to -1 from the end)")
    return layer


def _is_stats(source: Any) -> bool:
    from .analysis import LayerStats

    return isinstance(source, LayerStats) or (isinstance(source, (list, tuple)) and bool(source)
                                               and all(isinstance(s, LayerStats) for s in source))


def _stats_for(source: Any, condition: str | None = None) -> "LayerStats":
    """LayerStats of ``condition`` from stats, a list of stats, a capture or a path."""
    from .analysis import LayerStats, condition_stats

    if isinstance(source, LayerStats):
        if condition is not None and source.condition != condition:
            raise VislensError(f"stats are for condition {source.condition!r}, not {condition!r}")
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, LayerStats) for s in source):
        if condition is None:
            return source[0]
        for st in source:
            if st.condition == condition:
                return st
        have = ", ".join(s.condition for s in source)
        raise VislensError(f"no stats for condition {condition!r} (have {have})")
    with _capture(source) as cap:
        return condition_stats(cap, condition or baseline_condition(cap))


def _stats_list(source: Any, conditions: Sequence[str] | None = None) -> list["LayerStats"]:
    from .analysis import LayerStats, condition_stats

    if isinstance(source, LayerStats):
        return [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, LayerStats) for s in source):
        if conditions is None:
            return list(source)
        by = {s.condition: s for s in source}
        missing = [c for c in conditions if c not in by]
        if missing:
            raise VislensError(f"no stats for condition {missing[0]!r}")
        return [by[c] for c in conditions]
    with _capture(source) as cap:
        names = list(conditions) if conditions else list(cap.conditions)
        mask = cap.box_mask()
        return [condition_stats(cap, c, mask=mask) for c in names]


def _auroc_curve(st: "LayerStats") -> pd.DataFrame:
    """Per-layer AUROC of head-mean overlap for ``st``; raises when it cannot exist."""
    if st.overlap is None:
        raise VislensError(f"condition {st.condition!r}: the capture has no object box mask "
                           "(/boxes/mask), so there is no overlap to score")
    df = metrics.per_layer_auroc(st.overlap, st.correct)
    if not np.isfinite(df["auroc"]).any():
        n_pos, n_neg = int(np.sum(st.correct)), int(np.sum(~np.asarray(st.correct, bool)))
        if n_pos == 0 or n_neg == 0:
            only = "correct" if n_neg == 0 else "incorrect"
            raise VislensError(f"condition {st.condition!r}: AUROC undefined, all {n_pos + n_neg} "
                               f"answers are {only} (need both classes)")
        raise VislensError(f"condition {st.condition!r}: AUROC undefined at every layer "
                           "(overlap is NaN: empty masks or all-zero attention)")
    return df


def best_layers(stats: Any, k: int = 1, *, condition: str | None = None) -> list[int]:
    """The ``k`` layers whose head-mean overlap best predicts a correct answer (AUROC)."""
    st = _stats_for(stats, condition)
    df = _auroc_curve(st)
    df = df[np.isfinite(df["auroc"])].sort_values(["auroc", "layer"], ascending=[False, True])
    return [int(x) for x in df["layer"].head(k)]


def default_layer(source: Any, condition: str | None = None) -> int:
    """Best-AUROC layer when a box mask exists and the AUROC is defined, else the middle layer."""
    st = _stats_for(source, condition)
    try:
        return best_layers(st, 1)[0]
    except VislensError:
        return st.num_layers // 2


# ----------------------------------------------------------------------------- Figure 3


def token_counts(cap: "Capture", n_image_tokens: Any = None, n_text_tokens: Any = None
                 ) -> tuple[np.ndarray | float, np.ndarray | float | None, str]:
    """Image and text token counts for Figure 3, and where they came from.

    Explicit arguments win; then per-sample ``/samples/n_image_tokens`` /
    ``n_text_tokens`` (0 = unknown), then root attrs of those names. Image tokens default
    to the grid cell count ``G*G`` (576 for LLaVA-1.5). Text tokens stay ``None`` when
    unknown: the token share is then not drawn.
    """
    smp = cap.samples
    src = []

    def stored(name: str) -> np.ndarray | float | None:
        if name in smp.columns:
            v = smp[name].to_numpy(dtype=float)
            if np.any(v > 0):
                src.append(f"/samples/{name}")
                return np.where(v > 0, v, np.nan)
        if cap.attrs.get(name) is not None:
            src.append(f"attr {name}")
            return float(cap.attrs[name])
        return None

    ni = n_image_tokens if n_image_tokens is not None else stored("n_image_tokens")
    nt = n_text_tokens if n_text_tokens is not None else stored("n_text_tokens")
    if n_image_tokens is not None or n_text_tokens is not None:
        src.insert(0, "arguments")
    if ni is None:
        g = _grid(cap)
        ni = float(g * g)
        src.append(f"image tokens = grid cells ({g}x{g})")
    return ni, nt, ", ".join(src)


@_styled
def attention_share(source: Source, *, condition: str | None = None,
                    n_image_tokens: int | np.ndarray | None = None,
                    n_text_tokens: int | np.ndarray | None = None) -> "Figure":
    """Figure 3: image tokens' share of the prompt vs their share of the attention, per layer.

    Attention share = ``image_mass / (image_mass + text_mass)`` of the answer position,
    head-mean, per sample and layer (line: mean over samples, band: 10th-90th percentile).
    Token share = ``n_image / (n_image + n_text)`` (dashed), from the arguments or the
    capture (see :func:`token_counts`); without text token counts only the attention share
    is drawn and the title says so.
    """
    with _capture(source) as cap:
        cond = condition or baseline_condition(cap)
        img, txt = cap.masses(cond)
        done = cap.done(cond)
        if not done.any():
            raise VislensError(f"{cap.path}: condition {cond!r} has no completed samples")
        ni, nt, origin = token_counts(cap, n_image_tokens, n_text_tokens)
        im, tx = img[done].mean(axis=-1), txt[done].mean(axis=-1)  # [n, L] head-mean
        # per-sample counts: NaN where unknown; both must be known for a token share
        n_img = np.broadcast_to(np.asarray(ni, dtype=float), done.shape)[done]
        n_txt = np.broadcast_to(np.asarray(np.nan if nt is None else nt, dtype=float), done.shape)[done]
        known = np.isfinite(n_img) & np.isfinite(n_txt)
        share = metrics.attention_share(im, tx, np.where(known, n_img, 0.0), np.where(known, n_txt, 0.0))
        att = share.attention_share
        token = float(share.token_share[known, 0].mean()) if known.any() else None
        where = _provenance(cap)
        label = _label(cap, cond)
    if not np.isfinite(att).any():
        raise VislensError(f"condition {cond!r}: no image/text attention masses stored")
    L = att.shape[1]
    layers = np.arange(L)
    mean = np.nanmean(att, axis=0) * 100
    lo, hi = (np.nanpercentile(att, q, axis=0) * 100 for q in (10, 90))
    pal = _series_colors(3)

    fig = _figure(9.0, 3.6)
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 1])
    ax.fill_between(layers, lo, hi, color=pal[1], alpha=0.25, linewidth=0, label="10th-90th percentile")
    ax.plot(layers, mean, color=pal[1], marker="o", label="image share of the attention")
    if token is not None:
        ax.axhline(token * 100, color=pal[0], linestyle="--", label="image share of the prompt tokens")
    ax.set_xlabel("layer")
    ax.set_ylabel("image share (%)")
    _pct_axis(ax)
    ax.set_xlim(-0.5, L - 0.5)
    ax.legend(loc="best")
    att_all = float(np.nanmean(att)) * 100
    names = ["prompt tokens", "attention"]
    values = [token * 100 if token is not None else np.nan, att_all]
    bars = bx.bar(names, np.nan_to_num(values), color=[pal[0], pal[1]], edgecolor="black", linewidth=0.6)
    for b, v in zip(bars, values):
        text = f"{v:.0f}%" if np.isfinite(v) else "not\nstored"
        bx.annotate(text, (b.get_x() + b.get_width() / 2, np.nan_to_num(v)), ha="center", va="bottom",
                    xytext=(0, 3), textcoords="offset points", fontsize=9)
    bx.set_ylim(0, 110)
    bx.set_ylabel("image share, all layers (%)")
    bx.grid(axis="x", visible=False)
    if token is not None:
        title = (f"Image tokens: {token * 100:.0f}% of the prompt, {att_all:.0f}% of the answer "
                 f"position's attention ({label})")
    else:
        title = (f"Image share of the answer position's attention: {att_all:.0f}% ({label}); token "
                 f"share not drawn: the capture stores no text token counts")
    fig.suptitle(textwrap.fill(title, 110))
    _integer_layers(ax)
    _footer(fig, f"{where}; token counts: {origin}; attention share = image mass / "
                 "(image + text mass), head mean")
    return fig


# ----------------------------------------------------------------------------- Figure 4


def _accuracy(tab: pd.DataFrame) -> tuple[float, float, float, int]:
    """:func:`accuracy_interval` of a results table's ``correct`` column."""
    return accuracy_interval(tab["correct"].to_numpy(bool))


def _yerr(acc: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Asymmetric error bars ``[2, n]`` from an interval (the Wilson interval is not
    centred on the observed accuracy)."""
    return np.vstack([np.asarray(acc) - np.asarray(lo), np.asarray(hi) - np.asarray(acc)])


@_styled
def add_constant_accuracy(source: Source) -> "Figure":
    """Figure 4: accuracy vs an additive constant on the image attention logits.

    Conditions with method ``add`` (attr ``delta``) multiply every image weight by
    ``e**delta`` before renormalising; the baseline is ``delta = 0``. x axis: the factor
    ``e**delta`` (log scale; top axis: delta). Error bars: 95% Wilson intervals. Conditions
    restricted to some layers/heads get their own line.
    """
    with _capture(source) as cap:
        adds = _methods(cap, "add")
        if not adds:
            raise VislensError(f"{cap.path}: no 'add' conditions (capture with --condition add:delta=D)")
        base = baseline_condition(cap)
        tab = cap.table()
        groups: dict[str, list[tuple[float, str]]] = {}
        for name, attrs in adds:
            key = ""
            if attrs.get("layers") is not None:
                key += f"layers {_ranges(np.atleast_1d(attrs['layers']))}"
            if attrs.get("heads") is not None:
                key += (" " if key else "") + f"heads {_ranges(np.atleast_1d(attrs['heads']))}"
            groups.setdefault(key or "all layers and heads", []).append((float(attrs["delta"]), name))
        where = _provenance(cap)
    base_acc = _accuracy(tab[tab["condition"] == base])
    fig = _figure(6.2, 4.2)
    ax = fig.subplots()
    colors = _series_colors(max(2, len(groups)))
    all_x = [1.0]
    for i, (key, items) in enumerate(sorted(groups.items())):
        pts = [(0.0, *base_acc)] + [(d, *_accuracy(tab[tab["condition"] == n])) for d, n in items]
        pts.sort()
        d = np.array([p[0] for p in pts])
        acc, lo, hi = (np.array([p[k] for p in pts]) for k in (1, 2, 3))
        ax.errorbar(np.exp(d), acc, yerr=_yerr(acc, lo, hi), color=colors[i], capsize=3, label=key,
                    **_style_key(i))
        all_x.extend(np.exp(d).tolist())
    ax.errorbar([1.0], [base_acc[0]], yerr=_yerr([base_acc[0]], [base_acc[1]], [base_acc[2]]),
                color="black", marker="*", markersize=12, linestyle="none", capsize=3,
                label=f"baseline (δ = 0): {_acc_text(base_acc)}, n = {base_acc[3]}", zorder=5)
    ax.set_xscale("log")
    xs = sorted(set(round(x, 9) for x in all_x))
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:.3g}\nδ={math.log(x):+.3g}".replace("δ=+0", "δ=0") for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("factor e^δ on the image attention weights (log scale; δ added to image logits)")
    ax.set_ylabel("accuracy (%)")
    _pct_axis(ax)
    ax.legend(loc="best")
    fig.suptitle("Accuracy vs a constant δ added to the image attention logits")
    _footer(fig, f"{where}; error bars: 95% Wilson intervals")
    return fig


# ----------------------------------------------------------------------------- heatmaps


def resolve_image(path: str, cap_dir: Path) -> Path | None:
    """A capture's stored image path as an existing file (absolute, beside the capture, or
    under the working directory), or None."""
    if not path:
        return None
    p = Path(path)
    for cand in ([p] if p.is_absolute() else [cap_dir / p, Path.cwd() / p]):
        if cand.is_file():
            return cand
    return None


def _load_grey(path: str, cap_dir: Path) -> np.ndarray | None:
    """Greyscale image as float array, or None when the file is missing or unreadable."""
    found = resolve_image(path, cap_dir)
    if found is None:
        return None
    try:
        from PIL import Image

        with Image.open(found, formats=IMAGE_FORMATS) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception:  # unreadable image: draw the heatmap without an underlay
        return None


def _short_question(q: str, width: int = 34, lines: int = 3) -> str:
    q = " ".join(str(q).split())
    if "?" in q:
        q = q[:q.index("?") + 1]
    wrapped = textwrap.wrap(q, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:max(0, width - 1)] + "…"
    return "\n".join(wrapped)


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _head_mean_share(attn: np.ndarray) -> np.ndarray:
    """[..., H, G, G] -> [..., G, G] head-mean map as % of its image attention."""
    m = attn.mean(axis=-3)
    return metrics.normalize_maps(m) * 100.0


def pick_examples(tab: pd.DataFrame, n: int, *, correct: bool | None = None) -> list[int]:
    """Up to ``n`` capture rows (of one outcome if ``correct`` is given), round-robin over
    gold relations; within a relation the most confident answers first (a confident
    mistake is the interesting failure). ``tab``: rows of :meth:`Capture.table`."""
    t = tab if correct is None else tab[tab["correct"] == correct]
    if t.empty or n <= 0:
        return []
    t = t.sort_values(["confidence", "row"], ascending=[False, True])
    queues = {rel: list(g["row"]) for rel, g in t.groupby("relation", sort=False)}
    order = list(dict.fromkeys(t["relation"]))
    out: list[int] = []
    while len(out) < n and any(queues.values()):
        for rel in order:
            if queues[rel] and len(out) < n:
                out.append(int(queues[rel].pop(0)))
    return out


#: how much of the image's grey-level contrast the heatmap underlay keeps: the image is
#: drawn faintly, as ``1 - UNDERLAY_CONTRAST * (1 - grey)`` (white stays white, black becomes
#: light grey), so dark objects cannot pass for low attention
UNDERLAY_CONTRAST = 0.3
#: opacity of the attention overlay drawn over the faint image
OVERLAY_ALPHA = 0.75


def faint_image(grey: np.ndarray) -> np.ndarray:
    """The heatmap underlay: a grey image in [0, 1] squeezed into ``[1 - UNDERLAY_CONTRAST, 1]``."""
    return 1.0 - UNDERLAY_CONTRAST * (1.0 - np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0))


class _Panels:
    """What the heatmap figures need about the capture's samples, read once.

    Each panel: the image faintly in grey (:func:`faint_image`), the attention map over it
    as a separate overlay with opacity :data:`OVERLAY_ALPHA` (opaque when the image is
    missing), and the object boxes as white outlines with a black edge.
    """

    def __init__(self, cap: "Capture") -> None:
        self.cap_dir = cap.path.parent
        self.samples = cap.samples
        self.boxes = cap.boxes()
        self.grid = _grid(cap)
        self.where = capture_label(cap)

    def draw(self, ax: "Axes", row: int, amap: np.ndarray, norm: Any, title: str) -> Any:
        from matplotlib import patheffects
        from matplotlib.patches import Rectangle

        s = self.samples.iloc[row]
        image = _load_grey(str(s["image_path"]), self.cap_dir)
        w, h = int(s["width"]), int(s["height"])
        if (w <= 0 or h <= 0) and image is not None:
            h, w = image.shape[:2]
        pixels = w > 0 and h > 0
        if not pixels:
            w = h = self.grid
        extent = (0, w, h, 0)
        if image is not None:
            ax.imshow(faint_image(image), cmap="gray", extent=extent, vmin=0, vmax=1,
                      interpolation="bilinear")
        mappable = ax.imshow(amap, cmap=CMAP, norm=norm, extent=extent, interpolation="nearest",
                             alpha=OVERLAY_ALPHA if image is not None else 1.0)
        if pixels and self.boxes is not None:
            stroke = [patheffects.withStroke(linewidth=3.2, foreground="black")]
            for _, b in self.boxes[self.boxes["row"] == row].iterrows():
                rect = Rectangle((b["x0"], b["y0"]), b["x1"] - b["x0"], b["y1"] - b["y0"], fill=False,
                                 edgecolor="white", linewidth=1.6)
                rect.set_path_effects(stroke)
                ax.add_patch(rect)
                ax.text(b["x0"], b["y0"], f" {b['label']}", color="white", fontsize=7, va="bottom",
                        ha="left", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
                        clip_on=True)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(title, fontsize=8)
        if image is None:
            ax.text(0.02, 0.02, "image not found", transform=ax.transAxes, fontsize=6.5, color="white",
                    path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
        return mappable


def _norm(maps: Sequence[np.ndarray]):
    from matplotlib.colors import Normalize

    vals = np.concatenate([np.ravel(m) for m in maps]) if maps else np.array([])
    vals = vals[np.isfinite(vals)]
    vmax = float(np.percentile(vals, 99.5)) if vals.size else 1.0
    return Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)


def _scalar_mappable(norm: Any) -> Any:
    """Colour bar source with the heatmap's norm and colour map but no overlay transparency."""
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=CMAP)


_CBAR_LABEL = "share of the image attention per grid cell (%)"


@_styled
def attention_heatmaps(source: Source, layer: int | None = None, *, condition: str | None = None,
                       rows: Mapping[str, Sequence[int]] | None = None, n_examples: int = 3
                       ) -> "Figure":
    """Figure 5: where the answer position looks, correct vs incorrect answers, at ``layer``.

    Each panel is the head-mean attention at ``layer`` as a share of the image attention,
    on the analysis grid laid over the whole original image (cell ``(r, c)`` covers rows
    ``r/G..(r+1)/G`` of the image height and columns ``c/G..(c+1)/G`` of its width), over
    the image in grey (skipped when the file is missing) with the question's object boxes.
    One colour scale for all panels. ``rows`` may give ``{"correct": [...], "incorrect":
    [...]}``; by default :func:`pick_examples` chooses ``n_examples`` of each.
    """
    with _capture(source) as cap:
        cond = condition or baseline_condition(cap)
        L = _num_layers(cap)
        layer = check_layer(layer if layer is not None else default_layer(cap, cond), L, cap.path)
        tab = cap.table(conditions=[cond])
        if tab.empty:
            raise VislensError(f"{cap.path}: condition {cond!r} has no completed samples")
        if rows is None:
            chosen = {o: pick_examples(tab, n_examples, correct=(o == "correct")) for o in _OUTCOMES}
        else:
            chosen = {o: [int(r) for r in rows.get(o, [])] for o in _OUTCOMES}
        chosen = {o: r for o, r in chosen.items() if r}
        if not chosen:
            raise VislensError(f"{cap.path}: no examples to draw for condition {cond!r}")
        not_done = [r for rws in chosen.values() for r in rws if r not in set(tab["row"])]
        if not_done:
            raise VislensError(f"{cap.path}: row {not_done[0]} is not completed under {cond!r}")
        panels = _Panels(cap)
        maps = {o: _head_mean_share(cap.attention(cond, rows=r, layers=[layer])[:, 0])
                for o, r in chosen.items()}
        by_row = tab.set_index("row")
        label = _label(cap, cond)
        ncol = max(len(r) for r in chosen.values())
        norm = _norm(list(maps.values()))
        fig = _figure(2.55 * ncol + 1.0, 3.0 * len(chosen) + 0.4)
        axes = np.atleast_2d(fig.subplots(len(chosen), ncol, squeeze=False))
        for i, (outcome, rws) in enumerate(chosen.items()):
            for j in range(ncol):
                ax = axes[i, j]
                if j >= len(rws):
                    ax.set_axis_off()
                    continue
                r = rws[j]
                info = by_row.loc[r]
                title = (f"{_short_question(panels.samples.iloc[r]['question'])}\n"
                         f"gold {info['answer']} · pred {str(info['prediction']).strip()[:18]} "
                         f"{_mark(bool(info['correct']))}")
                panels.draw(ax, r, maps[outcome][j], norm, title)
                if j == 0:
                    ax.set_ylabel(f"{outcome} answers", fontsize=10)
        fig.colorbar(_scalar_mappable(norm), ax=axes, shrink=0.8, label=_CBAR_LABEL)
        missing = [o for o in _OUTCOMES if o not in chosen]
        note = f" (no {missing[0]} answers in this capture)" if missing and rows is None else ""
        fig.suptitle(f"Attention of the answer position over the image, layer {layer}, head mean, "
                     f"{label}, {panels.where}{note}")
    return fig


# ----------------------------------------------------------------------------- Figures 6-7


@_styled
def overlap_roc(source: Any, layers: Sequence[int] | None = None, *, condition: str | None = None,
                dataset: str | None = None) -> "Figure":
    """Figure 6: ROC of attention/box overlap predicting a correct answer, at two layers.

    The score is the cosine overlap of the head-mean map with the object mask
    (:func:`vislens.metrics.overlap`). ``layers`` default to the two best-AUROC layers.
    ``source``: a capture, a path, or :class:`~vislens.analysis.LayerStats`; ``dataset``
    names the data in the title (default: the capture's :func:`dataset_label`).
    """
    if dataset is None and not _is_stats(source):
        with _capture(source) as cap:
            dataset = capture_label(cap)
    st = _stats_for(source, condition)
    curve = _auroc_curve(st)
    if layers is None:
        layers = best_layers(st, 2)
    layers = [check_layer(x, st.num_layers, f"condition {st.condition!r}") for x in layers]
    if not layers:
        raise VislensError("overlap_roc: no layers to draw")
    fig = _figure(3.6 * len(layers) + 0.3, 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(layers), sharey=True))
    pal = _series_colors(3)
    for ax, layer in zip(axes, layers):
        fpr, tpr, _ = metrics.roc(st.overlap[:, layer], st.correct)
        row = curve[curve["layer"] == layer].iloc[0]
        ax.plot([0, 1], [0, 1], color="0.55", linestyle=":", linewidth=1, label="chance (0.5)")
        # straight segments between sklearn's points: a tie between a correct and an
        # incorrect answer is a diagonal, so the area under the line is the AUROC shown
        ax.plot(fpr, tpr, color=pal[0],
                label=f"AUROC {row['auroc']:.3f}\n{int(row['n_pos'])} correct / "
                      f"{int(row['n_neg'])} incorrect")
        ax.fill_between(fpr, 0, tpr, color=pal[1], alpha=0.15, linewidth=0)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("false positive rate (incorrect scored high)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.legend(loc="lower right")
    axes[0].set_ylabel("true positive rate (correct scored high)")
    fig.suptitle(f"Attention/object overlap predicts a correct answer ({st.condition}"
                 f"{', ' + dataset if dataset else ''})")
    return fig


@_styled
def plot_layer_auroc(auroc: pd.DataFrame) -> "Figure":
    """Overlap AUROC across layers, one line per condition.

    ``auroc`` is :func:`vislens.analysis.per_layer_auroc_table` (``condition, layer, auroc,
    n_pos, n_neg``); undefined AUROCs (one class) leave gaps.
    """
    if auroc is None or auroc.empty or not np.isfinite(auroc["auroc"].to_numpy(float)).any():
        raise VislensError("no defined per-layer AUROC (no box mask, or only one class of answers)")
    names = list(dict.fromkeys(auroc["condition"]))
    colors = _series_colors(max(2, len(names)))
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    ax.axhline(0.5, color="0.55", linestyle=":", linewidth=1, label="chance")
    for i, name in enumerate(names):
        d = auroc[auroc["condition"] == name].sort_values("layer")
        ax.plot(d["layer"], d["auroc"], color=colors[i], label=str(name), **_style_key(i))
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC (overlap → correct)")
    ax.set_ylim(0, 1.04)
    _integer_layers(ax)
    ax.legend(loc="best")
    fig.suptitle("Attention/object overlap as a predictor of a correct answer, per layer")
    return fig


def plot_roc_layers(stats: Any, layers: Sequence[int] | None = None) -> "Figure":
    """ROC curves of the overlap at ``layers`` (default: the two best): :func:`overlap_roc`."""
    return overlap_roc(stats, layers)


def cell_variance(source: Source, condition: str | None = None, *, chunk: int = 32
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, var[n, L])``: per sample and layer, the variance over grid cells of the head-mean
    map divided by its mean (``p * G*G`` with ``p`` the map normalised to sum 1): 0 for a
    uniform map, large when attention is concentrated on a few cells (grid-size free)."""
    with _capture(source) as cap:
        cond = condition or baseline_condition(cap)
        rows, parts = [], []
        for r, attn in cap.iter_attention(cond, chunk=chunk):
            p = metrics.normalize_maps(attn.mean(axis=2))  # [n, L, G, G]
            cells = p.shape[-1] * p.shape[-2]
            parts.append(np.var((p * cells).reshape(p.shape[:2] + (-1,)), axis=-1))
            rows.append(np.asarray(r))
        if not parts:
            raise VislensError(f"{cap.path}: condition {cond!r} has no completed samples")
        return np.concatenate(rows), np.concatenate(parts)


@_styled
def variance_and_auroc(source: Source, *, condition: str | None = None,
                       stats: "LayerStats | Sequence[LayerStats] | None" = None) -> "Figure":
    """Figure 7: concentration of the image attention (left) and overlap AUROC (right) per layer.

    Left: per layer, the variance over grid cells of the head-mean attention relative to
    uniform (:func:`cell_variance`), mean over samples for correct and incorrect answers
    with 25th-75th percentile bands; the caption gives the across-layer variance of image
    attention mass per sample (:func:`vislens.metrics.layer_variance`). Right: AUROC of
    the head-mean overlap with the object mask predicting a correct answer, per layer
    (without a box mask, or with one class only, the right panel says why it is empty).
    """
    with _capture(source) as cap:
        cond = condition or baseline_condition(cap)
        st = _stats_for(stats if stats is not None else cap, cond)
        rows, var = cell_variance(cap, cond)
        data = capture_label(cap)
    pos = {int(r): i for i, r in enumerate(st.rows)}
    correct = np.array([bool(st.correct[pos[int(r)]]) for r in rows])
    L = var.shape[1]
    layers = np.arange(L)
    pal = _outcome_palette()
    fig = _figure(10.0, 3.9)
    ax, bx = fig.subplots(1, 2)
    for i, (outcome, sel) in enumerate((("correct", correct), ("incorrect", ~correct))):
        if not sel.any():
            continue
        v = var[sel]
        ax.fill_between(layers, np.nanpercentile(v, 25, axis=0), np.nanpercentile(v, 75, axis=0),
                        color=pal[outcome], alpha=0.2, linewidth=0)
        ax.plot(layers, np.nanmean(v, axis=0), color=pal[outcome], label=f"{outcome} (n={int(sel.sum())})",
                **_style_key(i))
    if np.nanmin(var) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("variance over cells of attention ÷ uniform\n(0 for a uniform map" +
                  ("; log scale)" if ax.get_yscale() == "log" else ")"))
    ax.set_title("how concentrated the image attention is")
    ax.set_xlim(-0.5, L - 0.5)
    ax.legend(loc="best")
    lv = np.var(st.image_mass, axis=1)
    ax.text(0.01, -0.22, f"variance of image attention mass across layers, per sample: mean "
            f"{np.nanmean(lv):.3g}", transform=ax.transAxes, fontsize=7, color="0.35")
    bx.axhline(0.5, color="0.55", linestyle=":", linewidth=1, label="chance")
    bx.set_xlabel("layer")
    bx.set_ylabel("AUROC (overlap → correct)")
    bx.set_xlim(-0.5, L - 0.5)
    bx.set_ylim(0, 1.04)
    bx.set_title("overlap with the object boxes predicts a correct answer")
    try:
        curve = _auroc_curve(st)
    except VislensError as exc:
        bx.text(0.5, 0.5, textwrap.fill(f"no AUROC: {exc}", 40), transform=bx.transAxes, ha="center",
                va="center", fontsize=8, color="0.3")
    else:
        col = _series_colors(3)[0]
        bx.plot(curve["layer"], curve["auroc"], color=col, marker="o", label="AUROC per layer")
        best = curve.loc[curve["auroc"].idxmax()]
        bx.scatter([best["layer"]], [best["auroc"]], s=120, facecolors="none", edgecolors="black",
                   zorder=5, label=f"highest on these samples: layer {int(best['layer'])} "
                                   f"({best['auroc']:.2f})")
        bx.legend(loc="best")
    _integer_layers(ax, bx)
    fig.suptitle(f"Image attention across layers ({st.condition}, {data})")
    return fig


# ----------------------------------------------------------------------------- Figure 8


def _top_relations(tab: pd.DataFrame, k: int) -> list[str]:
    rel = tab.loc[tab["relation"].astype(str) != "", "relation"].astype(str)
    counts = rel.value_counts()
    return sorted(counts.index[:k], key=lambda r: (-counts[r], r))


@_styled
def scaling_sweep(source: Source, *, max_relations: int = 8) -> "Figure":
    """Figure 8: accuracy (left) and confidence (right) vs the ScalingVis coefficient alpha.

    One line per gold relation (the ``max_relations`` most frequent) plus all samples
    (black); the baseline is ``alpha = 1``; x axis log2-scaled. Accuracies carry their 95%
    Wilson intervals: a band around the overall line, error bars on the relation lines
    (nudged sideways so they do not overlap). Each AdaptVis condition present is drawn as a
    horizontal reference (with its interval as a band) on the accuracy panel.
    """
    with _capture(source) as cap:
        scal = _methods(cap, "scaling")
        if not scal:
            raise VislensError(f"{cap.path}: no 'scaling' conditions (capture with "
                               "--condition scaling:alpha=A)")
        base = baseline_condition(cap)
        tab = cap.table()
        adapt = [(n, a) for n, a in _methods(cap, "adaptvis")]
        alpha_of = {base: 1.0}
        for name, attrs in scal:
            if attrs.get("layers") is None and attrs.get("heads") is None:
                alpha_of.setdefault(name, float(attrs["alpha"]))
        if len(alpha_of) < 2:
            raise VislensError(f"{cap.path}: no unrestricted 'scaling' condition (all are limited "
                               "to some layers/heads)")
        where, data = _provenance(cap), capture_label(cap)
    t = tab[tab["condition"].isin(alpha_of)].assign(alpha=lambda d: d["condition"].map(alpha_of))
    t = t.drop_duplicates(["row", "alpha"])
    rels = _top_relations(t, max_relations)
    fig = _figure(10.5, 4.0)
    ax, bx = fig.subplots(1, 2, sharex=True)
    colors = _series_colors(max(2, len(rels)))
    nudge = 2.0 ** (0.035 * (np.arange(len(rels)) - (len(rels) - 1) / 2))  # x offsets, log2 axis
    for k, (what, axis, unit) in enumerate((("correct", ax, "accuracy (%)"),
                                            ("confidence", bx, "mean confidence (%)"))):
        overall = t.groupby("alpha")[what].mean() * 100
        if what == "correct":
            iv = np.array([accuracy_interval(g["correct"])[:3] for _, g in t.groupby("alpha")])
            axis.fill_between(overall.index, iv[:, 1], iv[:, 2], color="0.5", alpha=0.22,
                              linewidth=0, label="all: 95% Wilson interval", zorder=1)
        axis.plot(overall.index, overall.values, color="black", linewidth=2.6, marker="o",
                  label=f"all (n={t['row'].nunique()})", zorder=4)
        for i, rel in enumerate(rels):
            sub = t[t["relation"].astype(str) == rel]
            g = sub.groupby("alpha")[what].mean() * 100
            label = f"{rel} (n={sub['row'].nunique()})"
            if what == "correct":
                iv = np.array([accuracy_interval(gg["correct"])[:3] for _, gg in sub.groupby("alpha")])
                axis.errorbar(g.index * nudge[i], g.values, yerr=_yerr(iv[:, 0], iv[:, 1], iv[:, 2]),
                              color=colors[i], label=label, capsize=2, elinewidth=0.8,
                              **_style_key(i))
            else:
                axis.plot(g.index * nudge[i], g.values, color=colors[i], label=label, **_style_key(i))
        axis.axvline(1.0, color="0.5", linestyle=":", linewidth=1)
        axis.set_ylabel(unit)
        _pct_axis(axis)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("ScalingVis α (log₂ scale)")
    dashes = ((4, 2, 1, 2), (6, 2), (1, 1.5), (4, 1.5, 1, 1.5, 1, 1.5))
    for i, (name, attrs) in enumerate(adapt):  # every AdaptVis condition (e.g. a beta sweep)
        acc = accuracy_interval(tab.loc[tab["condition"] == name, "correct"].to_numpy(bool))
        ax.axhspan(acc[1], acc[2], color="0.3", alpha=0.08, linewidth=0)
        ax.axhline(acc[0], color="0.3", linestyle=(0, dashes[i % len(dashes)]), linewidth=1.2,
                   label=f"{condition_label(name, attrs)}: {_acc_text(acc)}")
    alphas = sorted(set(alpha_of.values()))
    ax.set_xticks(alphas)
    ax.set_xticklabels([f"{a:g}" for a in alphas])
    ax.minorticks_off()
    bx.minorticks_off()
    ax.set_title("accuracy by gold relation\n(bars, band: 95% Wilson intervals)")
    bx.set_title("confidence by gold relation\n(max first-token probability)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"Scaling the image attention, {data}: accuracy and confidence vs α\n"
                 "(α = 1: baseline, α < 1 smooths, α > 1 sharpens)")
    _footer(fig, where)
    return fig


# ----------------------------------------------------------------------------- Figures 9-10


def scaling_condition(cap: "Capture", kind: str) -> str:
    """The most extreme unrestricted ScalingVis condition: ``smooth`` (alpha < 1) or ``sharpen``.

    Unrestricted = limited to neither some layers nor some heads; when every candidate is
    restricted, the most extreme of them."""
    if kind not in ("smooth", "sharpen"):
        raise VislensError(f"kind must be 'smooth' or 'sharpen', got {kind!r}")
    cands = [(float(a["alpha"]), n) for n, a in _methods(cap, "scaling")
             if (float(a["alpha"]) < 1 if kind == "smooth" else float(a["alpha"]) > 1)]
    if not cands:
        what = "alpha < 1 (smoothing)" if kind == "smooth" else "alpha > 1 (sharpening)"
        raise VislensError(f"{cap.path}: no 'scaling' condition with {what}")
    unrestricted = [c for c in cands if cap.condition_attrs(c[1]).get("layers") is None
                    and cap.condition_attrs(c[1]).get("heads") is None] or cands
    return (min(unrestricted) if kind == "smooth" else max(unrestricted))[1]


@_styled
def before_after(source: Source, layer: int | None = None, *, kind: str = "smooth",
                 condition: str | None = None, rows: Sequence[int] | None = None,
                 n_examples: int = 3) -> "Figure":
    """Figures 9 (``kind="smooth"``, alpha < 1) and 10 (``kind="sharpen"``, alpha > 1).

    The same examples before (baseline) and after the intervention, side by side, head-mean
    attention at ``layer`` with one colour scale per example. ``condition`` overrides the
    steered condition (default: :func:`scaling_condition`). Examples whose answer flips
    from wrong to right come first, then other flips, then the rest (round-robin over
    relations).
    """
    with _capture(source) as cap:
        base = baseline_condition(cap)
        cond = condition or scaling_condition(cap, kind)
        L = _num_layers(cap)
        layer = check_layer(layer if layer is not None else default_layer(cap, base), L, cap.path)
        tab = cap.table(conditions=[base, cond])
        tb = tab[tab["condition"] == base].set_index("row")
        tc = tab[tab["condition"] == cond].set_index("row")
        common = tb.index.intersection(tc.index)
        if common.empty:
            raise VislensError(f"{cap.path}: no sample completed under both {base!r} and {cond!r}")
        if rows is None:
            b, c = tb.loc[common], tc.loc[common]
            # 2: wrong -> right, 1: right -> wrong, 0: unchanged
            flip = (~b["correct"] & c["correct"]).astype(int) + (b["correct"] != c["correct"]).astype(int)
            cand = b.reset_index().assign(_flip=flip.to_numpy())
            rows = []
            for level in (2, 1, 0):
                rows += pick_examples(cand[cand["_flip"] == level], n_examples - len(rows))
        rows = [int(r) for r in rows]
        missing = [r for r in rows if r not in common]
        if missing:
            raise VislensError(f"{cap.path}: row {missing[0]} is not completed under both "
                               f"{base!r} and {cond!r}")
        panels = _Panels(cap)
        before = _head_mean_share(cap.attention(base, rows=rows, layers=[layer])[:, 0])
        after = _head_mean_share(cap.attention(cond, rows=rows, layers=[layer])[:, 0])
        lb, lc = _label(cap, base), _label(cap, cond)
        steered = cap.condition_attrs(cond).get("layers")
        fig = _figure(6.4, 2.95 * len(rows) + 0.5)
        subfigs = np.atleast_1d(fig.subfigures(len(rows), 1))
        for k, (sf, r) in enumerate(zip(subfigs, rows)):
            axs = sf.subplots(1, 2)
            norm = _norm([before[k], after[k]])
            for ax, amap, name, t in ((axs[0], before[k], lb, tb), (axs[1], after[k], lc, tc)):
                info = t.loc[r]
                panels.draw(ax, r, amap, norm, f"{name}\npred {str(info['prediction']).strip()[:18]} "
                                f"{_mark(bool(info['correct']))}")
            sf.colorbar(_scalar_mappable(norm), ax=list(axs), shrink=0.85, label="% of image attention")
            sf.suptitle(f"{_short_question(panels.samples.iloc[r]['question'], 70, 1)} "
                        f"(gold {tb.loc[r, 'answer']})", fontsize=9)
        what = "smoothing (α < 1)" if kind == "smooth" else "sharpening (α > 1)"
        if condition is not None:
            what = "intervention"
        note = ""
        if steered is not None and layer not in [int(x) for x in np.atleast_1d(steered)]:
            note = f"; layer {layer} is not steered (changes come from earlier layers)"
        fig.suptitle(f"Attention before and after {what}, layer {layer}, {panels.where}{note}")
    return fig


# ----------------------------------------------------------------------------- Figure 14-15

_ENTROPY_LABEL = "entropy (Eq. 4, nats)\nof each head's map, head mean"
_SKEW_LABEL = "positional skewness (Eq. 5)\nof each head's map, head mean"


@_styled
def entropy_skewness(source: Any, layer: int | None = None, *,
                     conditions: Sequence[str] | None = None) -> "Figure":
    """Figure 14: entropy (left) and skewness (right) of the image attention at ``layer``.

    Per condition of one capture, box plots for correct and incorrect answers: entropy
    (Eq. 4, nats; ``log(G*G)`` = uniform) and positional skewness (Eq. 5: third moment of
    the row-major cell index under the normalised map) of each head's map, averaged over
    heads (:mod:`vislens.metrics`). ``source``: capture, path or a list of LayerStats. The
    paper's Figure 14 compares subsets: :func:`subset_entropy_skewness`.
    """
    import seaborn as sns

    stats = _stats_list(source, conditions)
    if not stats:
        raise VislensError("entropy_skewness: no conditions")
    L = stats[0].num_layers
    if layer is None:
        layer = default_layer(stats[0])
    layer = check_layer(layer, L, "entropy_skewness")
    frames = []
    for st in stats:
        frames.append(pd.DataFrame({
            "condition": st.condition, "entropy": st.entropy[:, layer], "skewness": st.skewness[:, layer],
            "outcome": np.where(np.asarray(st.correct, bool), "correct", "incorrect")}))
    df = pd.concat(frames, ignore_index=True)
    order = [st.condition for st in stats]
    hue_order = [o for o in _OUTCOMES if o in set(df["outcome"])]
    pal = _outcome_palette()
    fig = _figure(max(6.5, 1.15 * len(order) + 2.0), 6.6)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, col, unit in ((axes[0], "entropy", _ENTROPY_LABEL), (axes[1], "skewness", _SKEW_LABEL)):
        with _quiet_seaborn():
            sns.boxplot(data=df, x="condition", y=col, hue="outcome", order=order, hue_order=hue_order,
                        palette=pal, ax=ax, fliersize=2, linewidth=0.8, linecolor="0.15")
        ax.set_ylabel(unit)
        if ax.get_legend() is not None:
            ax.get_legend().set_title("")
    axes[0].set_xlabel("")
    axes[1].set_xlabel("condition")
    axes[1].tick_params(axis="x", rotation=20)
    if axes[1].get_legend() is not None:
        axes[1].get_legend().remove()
    fig.suptitle(f"Shape of the image attention per condition, layer {layer}")
    return fig


@_styled
def confidence_by_relation(source: Any, *, condition: str | None = None, max_relations: int = 12
                           ) -> "Figure":
    """Figure 15: confidence of the first answer token by gold relation (box plots).

    ``source``: capture, path, or a :meth:`~vislens.store.Capture.table` DataFrame. Boxes
    split by outcome; relations sorted by median confidence; the ``max_relations`` most
    frequent relations only.
    """
    import seaborn as sns

    if isinstance(source, pd.DataFrame):
        tab = source
        names = list(dict.fromkeys(tab["condition"]))
        if not names:
            raise VislensError("confidence_by_relation: the table is empty")
        cond = condition or ("baseline" if "baseline" in names else str(names[0]))
    else:
        with _capture(source) as cap:
            cond = condition or baseline_condition(cap)
            tab = cap.table(conditions=[cond])
    t = tab[tab["condition"] == cond]
    if t.empty:
        raise VislensError(f"condition {cond!r} has no completed samples")
    rels = _top_relations(t, max_relations)
    if not rels:
        raise VislensError(f"condition {cond!r}: the capture has no gold relations "
                           "(/samples/relation is empty)")
    t = t[t["relation"].astype(str).isin(rels)].assign(
        outcome=lambda d: np.where(d["correct"].astype(bool), "correct", "incorrect"),
        confidence_pct=lambda d: d["confidence"].astype(float) * 100)
    order = list(t.groupby("relation")["confidence_pct"].median().sort_values(ascending=False).index)
    hue_order = [o for o in _OUTCOMES if o in set(t["outcome"])]
    fig = _figure(max(6.0, 0.9 * len(order) + 2.5), 4.0)
    ax = fig.subplots()
    with _quiet_seaborn():
        sns.boxplot(data=t, x="relation", y="confidence_pct", hue="outcome", order=order,
                    hue_order=hue_order, palette=_outcome_palette(), ax=ax, fliersize=0,
                    linewidth=0.8, linecolor="0.15")
    sns.stripplot(data=t, x="relation", y="confidence_pct", hue="outcome", order=order,
                  hue_order=hue_order, dodge=True, ax=ax, size=2.5, palette={o: "0.2" for o in _OUTCOMES}, alpha=0.5,
                  legend=False)
    counts = t["relation"].value_counts()
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{r}\n(n={counts[r]})" for r in order])
    ax.set_xlabel("gold relation")
    ax.set_ylabel("confidence: max first-token probability (%)")
    _pct_axis(ax)
    if ax.get_legend() is not None:
        ax.get_legend().set_title("")
    fig.suptitle(f"Confidence by gold relation ({cond})")
    return fig



# ----------------------------------------------------------------------------- subsets


def subset_labels(sources: Sequence[Any]) -> list[str]:
    """Readable, distinct labels of capture files/objects (:func:`dataset_label`); a label
    shared by several files gets the file stem appended, or as many of its last folders as
    tell the files apart (``x/run.h5``, ``y/run.h5`` -> ``x/run``, ``y/run``), or its
    position where it is the same file."""
    base, parts = [], []
    for src in sources:
        with _capture(src) as cap:
            base.append(capture_label(cap))
            parts.append(Path(cap.path).resolve().with_suffix("").parts)
    labels = list(base)
    for lab in {b for b in base if base.count(b) > 1}:
        idx = [i for i, b in enumerate(base) if b == lab]
        for k in range(1, max(len(parts[i]) for i in idx) + 1):
            names = [f"{lab} ({'/'.join(parts[i][-k:])})" for i in idx]
            if len(set(names)) == len(names):
                break
        else:
            names = [f"{lab} (#{i + 1})" for i in idx]
        for i, name in zip(idx, names):
            labels[i] = name
    return labels


def _subsets(subsets: Any) -> list[tuple[str, Any]]:
    """``(label, value)`` pairs from a mapping ``{label: value}`` or a sequence of captures/paths."""
    if isinstance(subsets, Mapping):
        items = [(str(k), v) for k, v in subsets.items()]
    elif isinstance(subsets, (list, tuple)):
        items = list(zip(subset_labels(subsets), subsets))
    else:
        items = list(zip(subset_labels([subsets]), [subsets]))
    if not items:
        raise VislensError("no subsets to compare (give one or more capture files)")
    return items


def _baseline_table(value: Any) -> pd.DataFrame:
    """The baseline rows of a results table, capture or path."""
    if isinstance(value, pd.DataFrame):
        names = list(dict.fromkeys(value["condition"]))
        if not names:
            raise VislensError("a results table is empty")
        return value[value["condition"] == ("baseline" if "baseline" in names else names[0])]
    with _capture(value) as cap:
        return cap.table(conditions=[baseline_condition(cap)])


@_styled
def subset_entropy_skewness(subsets: Any, layer: int | None = None) -> "Figure":
    """Figure 14: entropy (Eq. 4) and positional skewness (Eq. 5) of the image attention at
    ``layer``, compared across subsets (the paper: Controlled_A/B vs COCO).

    ``subsets``: a sequence of captures/paths (labelled by their dataset,
    :func:`subset_labels`) or a mapping ``{label: capture, path or baseline LayerStats}``.
    Each subset's baseline samples: a box plot per subset, its mean as a white diamond, and
    the subset's baseline accuracy with its 95% Wilson interval under its name. ``layer``
    defaults to the paper's layer 17 of 32 at this model's depth
    (:func:`vislens.analysis.paper_layer`). All subsets need the same number of layers.
    """
    import seaborn as sns

    from .analysis import PAPER_LAYERS, paper_layer

    items = [(label, _stats_for(v)) for label, v in _subsets(subsets)]
    depths = {st.num_layers for _, st in items}
    if len(depths) > 1:
        raise VislensError("the subsets come from models of different depth "
                           f"({', '.join(f'{lab}: {st.num_layers} layers' for lab, st in items)}); "
                           "compare captures of one model")
    L = depths.pop()
    layer = check_layer(paper_layer(PAPER_LAYERS[14][0], L) if layer is None else layer, L,
                        "subset_entropy_skewness")
    df = pd.concat([pd.DataFrame({"subset": lab, "entropy": st.entropy[:, layer],
                                  "skewness": st.skewness[:, layer]}) for lab, st in items],
                   ignore_index=True)
    order = [lab for lab, _ in items]
    pal = dict(zip(order, _series_colors(max(2, len(order)))))
    fig = _figure(max(5.0, 1.6 * len(order) + 2.2), 6.4)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, col, unit in ((axes[0], "entropy", _ENTROPY_LABEL), (axes[1], "skewness", _SKEW_LABEL)):
        with _quiet_seaborn():
            sns.boxplot(data=df, x="subset", y=col, hue="subset", order=order, hue_order=order,
                        palette=pal, ax=ax, fliersize=2, linewidth=0.8, linecolor="0.15",
                        width=0.55, legend=False)
        means = df.groupby("subset", sort=False)[col].mean().reindex(order)
        ax.plot(range(len(order)), means.to_numpy(), linestyle="none", marker="D", markersize=6,
                markerfacecolor="white", markeredgecolor="black", label="mean", zorder=5)
        ax.set_ylabel(unit)
        ax.set_xlabel("")
    axes[0].legend(loc="best")
    ticks = []
    for lab, st in items:
        acc = accuracy_interval(st.correct)
        ticks.append(f"{lab}\nn={acc[3]}, accuracy\n{_acc_text(acc)}")
    axes[1].set_xticks(range(len(order)))
    axes[1].set_xticklabels(ticks)
    axes[1].set_xlabel("subset (baseline answers; accuracy with 95% Wilson interval)")
    fig.suptitle(f"Shape of the image attention across subsets, layer {layer} of {L}")
    return fig


#: relation groups of Figure 15: the paper's "On etc" and "Under etc" pool synonyms
RELATION_GROUPS: dict[str, str] = {"left": "left", "right": "right", "on": "On etc",
                                   "above": "On etc", "top": "On etc", "under": "Under etc",
                                   "below": "Under etc", "bottom": "Under etc",
                                   "beneath": "Under etc", "front": "front", "behind": "behind"}
_GROUP_ORDER = ("left", "right", "On etc", "Under etc", "front", "behind")


def relation_group(relation: Any) -> str:
    """Figure 15's group of a gold relation: the first of its words found in
    :data:`RELATION_GROUPS` (``"in front of"`` -> ``front``, ``"on top of"`` -> ``On etc``),
    else ``"other"``."""
    for word in str(relation).lower().replace("_", " ").replace("-", " ").split():
        if word in RELATION_GROUPS:
            return RELATION_GROUPS[word]
    return "other"


def read_phrase_stats(path: str | os.PathLike) -> pd.DataFrame:
    """A ``vislens phrase-stats --out`` table (CSV, or JSON: records or ``{relation: ...}``)
    as a DataFrame indexed by relation with an ``occurrences`` column."""
    p = Path(path)
    if not p.is_file():
        raise VislensError(f"{p}: no such phrase-stats file (write one with vislens phrase-stats "
                           "CONVERSATIONS.json --out FILE.csv)")
    try:
        if p.suffix.lower() == ".json":
            import json

            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = [{"relation": k, **(v if isinstance(v, dict) else {"occurrences": v})}
                        for k, v in data.items()]
            df = pd.DataFrame(data)
        else:
            df = pd.read_csv(p)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise VislensError(f"{p}: not a phrase-stats table ({str(exc).splitlines()[0]})") from None
    if "relation" not in df.columns or "occurrences" not in df.columns:
        raise VislensError(f"{p}: a phrase-stats table needs columns 'relation' and 'occurrences' "
                           f"(has {', '.join(map(str, df.columns)) or 'none'})")
    occ = pd.to_numeric(df["occurrences"], errors="coerce")
    if occ.isna().any() or (occ < 0).any():
        raise VislensError(f"{p}: 'occurrences' must be non-negative counts")
    return df.assign(occurrences=occ.astype(int)).set_index("relation")


@_styled
def relation_familiarity(subsets: Any, phrase_stats: "pd.DataFrame | str | os.PathLike | None" = None
                         ) -> "Figure":
    """Figure 15: are the relations the model is unsure of the ones it rarely saw?

    Left: gold-label distribution per subset (% of each subset's samples per relation
    group, :func:`relation_group`). Middle: relation-phrase counts in LLaVA's training
    conversations, from ``phrase_stats`` (a :func:`vislens.phrases.phrase_stats` table or
    its ``vislens phrase-stats --out`` file); without it the panel says what to pass.
    Right: mean baseline confidence (max first-token probability) by gold relation group x
    subset, with the sample count in each cell. ``subsets``: a sequence of captures/paths,
    or ``{label: capture, path or results table}``.
    """
    import matplotlib as mpl

    items = [(label, _baseline_table(v)) for label, v in _subsets(subsets)]
    frames = []
    for lab, t in items:
        frames.append(pd.DataFrame({"subset": lab, "group": t["relation"].map(relation_group),
                                    "confidence": t["confidence"].astype(float) * 100}))
    df = pd.concat(frames, ignore_index=True)
    order = [lab for lab, _ in items]
    present = set(df["group"])
    groups = [g for g in _GROUP_ORDER if g in present] + (["other"] if "other" in present else [])
    if not groups:
        raise VislensError("no gold relations in the subsets (/samples/relation is empty)")
    if isinstance(phrase_stats, (str, os.PathLike)):
        phrase_stats = read_phrase_stats(phrase_stats)
    fig = _figure(max(12.0, 2.3 * len(groups) + 1.2 * len(order) + 5), 4.4)
    ax, px, hx = fig.subplots(1, 3, width_ratios=[1.3, 1.0, 0.35 * len(order) + 0.9])
    # left: label distribution
    share = pd.crosstab(df["group"], df["subset"], normalize="columns").reindex(
        index=groups, columns=order).fillna(0.0) * 100
    colors = _series_colors(max(2, len(order)))
    width = 0.8 / len(order)
    x = np.arange(len(groups))
    for i, lab in enumerate(order):
        ax.bar(x + (i - (len(order) - 1) / 2) * width, share[lab].to_numpy(), width, color=colors[i],
               edgecolor="black", linewidth=0.5, label=lab)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20)
    ax.set_ylabel("% of the subset's samples")
    ax.set_ylim(0, max(5.0, float(share.to_numpy().max()) * 1.15))
    ax.set_title("gold relation per subset")
    ax.legend(loc="best", title="subset")
    ax.grid(axis="x", visible=False)
    # middle: phrase counts in the training conversations
    px.set_title("phrases in LLaVA's training conversations")
    if phrase_stats is None:
        px.text(0.5, 0.5, "no phrase counts given:\nrun vislens phrase-stats\nCONVERSATIONS.json "
                "--out phrases.csv\nand pass --phrase-stats phrases.csv", transform=px.transAxes,
                ha="center", va="center", fontsize=8.5, color="0.3")
        px.set_xticks([])
        px.set_yticks([])
    else:
        # one bar per group: relations of one group (on, above) add up
        counts = phrase_stats["occurrences"].astype(float)
        counts = counts.groupby([RELATION_GROUPS.get(str(r), str(r)) for r in counts.index],
                                sort=False).sum()
        names = list(counts.index)
        bars = px.bar(names, counts.to_numpy(), color=_series_colors(3)[1], edgecolor="black",
                      linewidth=0.5)
        total = counts.sum()
        for b, v in zip(bars, counts.to_numpy()):
            px.annotate(f"{v:,.0f}\n({100 * v / total:.0f}%)" if total else "0", (b.get_x() + b.get_width() / 2, v),
                        ha="center", va="bottom", xytext=(0, 2), textcoords="offset points", fontsize=7)
        px.set_ylim(0, max(1.0, float(counts.max()) * 1.25))
        px.set_ylabel("occurrences")
        px.tick_params(axis="x", rotation=20)
        px.grid(axis="x", visible=False)
    # right: confidence heatmap
    mean = df.pivot_table(index="group", columns="subset", values="confidence", aggfunc="mean"
                          ).reindex(index=groups, columns=order)
    n = df.pivot_table(index="group", columns="subset", values="confidence", aggfunc="size"
                       ).reindex(index=groups, columns=order)
    cmap = mpl.colormaps[CMAP].with_extremes(bad="0.9")
    vals = mean.to_numpy(float)
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if hi - lo < 1:
        lo, hi = lo - 1, hi + 1
    im = hx.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    for r in range(vals.shape[0]):
        for c in range(vals.shape[1]):
            v = vals[r, c]
            if not np.isfinite(v):
                hx.text(c, r, "no\nsamples", ha="center", va="center", fontsize=7, color="0.4")
                continue
            dark = sum(cmap((v - lo) / (hi - lo))[:3]) / 3 < 0.5
            hx.text(c, r, f"{v:.0f}%\nn={int(n.iloc[r, c])}", ha="center", va="center", fontsize=7.5,
                    color="white" if dark else "black")
    hx.set_xticks(range(len(order)))
    hx.set_xticklabels(order, rotation=20)
    hx.set_yticks(range(len(groups)))
    hx.set_yticklabels(groups)
    hx.grid(False)
    hx.set_title("mean confidence (baseline)")
    fig.colorbar(im, ax=hx, shrink=0.85, label="mean max first-token probability (%)")
    fig.suptitle("Relations: how often each is asked, how often LLaVA saw it in training, how "
                 "confident the model is")
    _footer(fig, '"On etc" = on/above/top; "Under etc" = under/below/bottom/beneath; '
                 "confidence of the baseline condition of each subset")
    return fig


# ----------------------------------------------------------------------------- Figure 26


def centred_log_attention(attn: np.ndarray) -> np.ndarray:
    """``log w - mean(log w)`` over the cells of each ``[..., G, G]`` map, flattened.

    Softmax weights are ``w_i = exp(z_i) / Z`` over all keys, so ``log w_i = z_i - log Z``:
    the log weights of one map equal its logits up to a per-map constant, which centring
    removes. Cells with zero (float16 underflow) or non-finite weight are dropped. Exact
    only where one grid cell is one image token (the grid pools tokens by area).
    """
    a = np.asarray(attn, dtype=np.float64)
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1])
    ok = np.isfinite(flat) & (flat > 0)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no finite weight -> NaN
        logw = np.where(ok, np.log(np.where(ok, flat, 1.0)), np.nan)
        centre = np.nanmean(np.where(ok, logw, np.nan), axis=1, keepdims=True)
    vals = (logw - centre)[ok]
    return vals[np.isfinite(vals)]


def _rows_done_in_all(cap: "Capture", names: Sequence[str]) -> np.ndarray:
    """Rows done under every condition of ``names`` (one-line error when there are none)."""
    done = np.ones(len(cap), dtype=bool)
    for n in names:
        done &= cap.done(n)
    rows = np.flatnonzero(done)
    if rows.size == 0:
        raise VislensError(f"{cap.path}: no sample completed under all of {', '.join(names)}")
    return rows


@_styled
def log_attention_distribution(source: Source, layer: int | None = None, *,
                               conditions: Sequence[str] | None = None, max_samples: int = 256,
                               seed: int = 0) -> "Figure":
    """Figure 26: distribution of the image attention logits before/after scaling, at ``layer``.

    The capture holds softmax weights, not logits; since ``log w`` equals the logit up to a
    per-row constant, this plots the centred log weights over image cells,
    ``log w - mean(log w)`` per (sample, head) map (:func:`centred_log_attention`), for the
    baseline and each ScalingVis condition (default) or the given ``conditions``. ScalingVis
    multiplies image logits by alpha, so the spread scales by alpha (legend: standard
    deviations). Up to ``max_samples`` samples (a seeded random subset), all heads.
    """
    with _capture(source) as cap:
        base = baseline_condition(cap)
        if conditions is None:
            scal = sorted((float(a["alpha"]), n) for n, a in _methods(cap, "scaling"))
            names = [base] + [n for _, n in scal]
        else:
            names = list(conditions)
        if len(names) < 2:
            raise VislensError(f"{cap.path}: nothing to compare with the baseline (no 'scaling' "
                               "conditions)")
        L = _num_layers(cap)
        layer = check_layer(layer if layer is not None else default_layer(cap, base), L, cap.path)
        rows = _rows_done_in_all(cap, names)
        if rows.size > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_samples, replace=False))
        values = {n: centred_log_attention(cap.attention(n, rows=rows, layers=[layer])) for n in names}
        labels = {n: _label(cap, n) for n in names}
    allv = np.concatenate([v for v in values.values() if v.size])
    if allv.size == 0:
        raise VislensError("no positive attention weights to take the log of")
    lo, hi = np.percentile(allv, [0.2, 99.8])
    bins = np.linspace(lo, hi, 61)
    fig = _figure(6.8, 4.2)
    ax = fig.subplots()
    colors = _series_colors(len(names))
    for i, n in enumerate(names):
        v = values[n]
        if not v.size:
            continue
        dens, edges = np.histogram(v, bins=bins, density=True)  # the outer 0.2% are left out
        ls = "-" if n == base else _LINESTYLES[(i % (len(_LINESTYLES) - 1)) + 1]
        ax.stairs(dens, edges, color="black" if n == base else colors[i], linestyle=ls,
                  linewidth=2.2 if n == base else 1.6, label=f"{labels[n]} (sd {np.std(v):.2f})")
    ax.set_xlabel("centred log attention weight over image cells,\n"
                  "log w − mean log w (= logit − mean logit, nats)")
    ax.set_ylabel("density (per nat)")
    ax.legend(loc="best")
    fig.suptitle(f"Image attention logits before/after scaling, layer {layer} "
                 f"({rows.size} samples, all heads)")
    return fig


@_styled
def attention_logit_distribution(source: Source, layer: int | None = None, *,
                                 conditions: Sequence[str] | None = None) -> "Figure":
    """Figure 26: the answer row's image attention logits before/after ScalingVis, at ``layer``.

    Reads the capture's image-key logits (``q.k / sqrt(d)`` after the intervention, before
    mask and softmax; :meth:`vislens.store.Capture.image_logits`). Left panel: each
    sample's image-logit mean, averaged over heads; right: its image-logit max, the maximum
    over heads. One density line per condition: the baseline (before) and the steered
    conditions (after; default: the most extreme unrestricted ScalingVis condition with
    alpha < 1 and the one with alpha > 1 present, or the given ``conditions``). ScalingVis
    multiplies the logits by alpha, so alpha < 1 pulls the lines towards 0 and alpha > 1
    pushes them away. Samples the intervention corrected (wrong under the baseline, right
    under the condition) are ticks at the foot of each panel in the condition's colour. A
    version-1 capture (no logits) raises a one-line VislensError saying so.
    """
    with _capture(source) as cap:
        base = baseline_condition(cap)
        if conditions is None:
            names = []
            for kind in ("smooth", "sharpen"):
                try:
                    names.append(scaling_condition(cap, kind))
                except VislensError:
                    pass
        else:
            names = [n for n in conditions if n != base]
        if not names:
            raise VislensError(f"{cap.path}: nothing to compare with the baseline (no 'scaling' "
                               "conditions)")
        L = _num_layers(cap)
        layer = check_layer(layer if layer is not None else default_layer(cap, base), L, cap.path)
        order = [base] + names
        logits = {n: cap.image_logits(n) for n in order}
        tab = cap.table(conditions=order)
        right = {n: g.set_index("row")["correct"] for n, g in tab.groupby("condition")}
        rows = _rows_done_in_all(cap, order)
        for n in order:
            if not np.isfinite(logits[n][1][rows, layer]).any():
                raise VislensError(f"{cap.path}: condition {n!r} has no image logits at layer "
                                   f"{layer} (captured without attention recording?)")
        labels = {n: _label(cap, n) for n in order}
        where = _provenance(cap)
    base_ok = right[base].reindex(rows).to_numpy(dtype=bool)
    panels = (("mean", "image-logit mean, averaged over heads",
               lambda m, x: np.nanmean(m[rows, layer], axis=-1)),
              ("max", "image-logit max, maximum over heads",
               lambda m, x: np.nanmax(x[rows, layer], axis=-1)))
    fig = _figure(10.5, 4.4)
    axes = fig.subplots(1, 2)
    colors = _series_colors(len(order))
    for ax, (_, xlabel, reduce) in zip(axes, panels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row stays NaN
            values = {n: reduce(*logits[n]) for n in order}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite image logits", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo) or 0.5
        bins = np.linspace(lo - pad, hi + pad, 41)
        for i, n in enumerate(order):
            v = values[n]
            ok = np.isfinite(v)
            dens, edges = np.histogram(v[ok], bins=bins, density=True)
            is_base = n == base
            color = "black" if is_base else colors[i]
            label = f"{labels[n]} (mean {np.mean(v[ok]):.3g})" if ok.any() else labels[n]
            if not is_base:
                fixed = ok & ~base_ok & right[n].reindex(rows).to_numpy(dtype=bool)
                label += f", {int(fixed.sum())} corrected"
                # corrected cases: a row of ticks at the panel's foot, at this condition's values
                ax.plot(v[fixed], np.full(int(fixed.sum()), 0.035 * i), "|", color=color,
                        markersize=9, markeredgewidth=1.6, transform=ax.get_xaxis_transform())
            ax.stairs(dens, edges, color=color,
                      linestyle="-" if is_base else _LINESTYLES[(i % (len(_LINESTYLES) - 1)) + 1],
                      linewidth=2.2 if is_base else 1.6, label=label)
        ax.set_xlabel(xlabel + "\n(ticks at the foot: samples the condition corrected)")
        ax.set_ylabel("density")
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title("mean over image keys")
    axes[1].set_title("max over image keys")
    fig.suptitle(f"Image attention logits (q·k/√d) before/after scaling, layer {layer} "
                 f"({rows.size} samples)")
    _footer(fig, where)
    return fig
