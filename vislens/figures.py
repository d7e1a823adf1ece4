"""``vislens figures FILE.h5 [MORE.h5 ...] --out figures/``: the paper's figures from captures.

:func:`write_figures` draws every figure of :mod:`vislens.plots` the captures can support and
skips the others with a one-line note. Most figures describe one capture (the first file);
the cross-subset figures (14 and 15) compare all the files given, one subset each, labelled
by their dataset (:func:`vislens.plots.subset_labels`) (a figure that needs ``add`` conditions, a box mask or
both correct and incorrect answers raises :class:`~vislens.errors.VislensError`, which is
caught here). Statistics are streamed once per condition and shared between figures.

Figures are entries of :data:`FIGURE_SPECS`, keyed by paper figure number; a new figure is
one ``FIGURE_SPECS.add(...)``. The notebooks' helpers live in :mod:`vislens.notebook`.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import VislensError
from .io import add_force_argument
from .registry import Registry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .analysis import LayerStats
    from .store import Capture

__all__ = [
    "FIGURES",
    "FIGURE_SPECS",
    "FigureSpec",
    "add_arguments",
    "describe_paper_layers",
    "paper_figure_layers",
    "main",
    "run",
    "save_figure",
    "write_figures",
]

FORMATS = ("png", "pdf", "svg")


def paper_figure_layers(num_layers: int) -> dict[int, list[int]]:
    """``{figure: [layers]}``: the paper's layers of each per-layer figure
    (:data:`vislens.analysis.PAPER_LAYERS`) at the relative depth of a ``num_layers`` model."""
    from .analysis import PAPER_LAYERS, paper_layer

    return {k: sorted({paper_layer(x, num_layers) for x in v}) for k, v in PAPER_LAYERS.items()}


def describe_paper_layers(num_layers: int) -> str:
    """One line saying which layers :func:`paper_figure_layers` gives, for logs."""
    lay = paper_figure_layers(num_layers)
    return (f"the paper's layers at this model's depth ({num_layers} layers): Figs. 5, 9, 10, 14 "
            f"layer {lay[5][0]}, Fig. 6 layers {' and '.join(map(str, lay[6]))}, Fig. 26 layer "
            f"{lay[26][0]}")


class _Context:
    """One open capture plus lazily computed, shared per-condition statistics.

    The layer of the per-layer figures: ``layer`` (an int) for all of them; ``"best"`` for
    the layer whose baseline overlap AUROC is highest on the *validation* samples (Figure 6
    is then drawn on the test samples only); ``None`` for the paper's layers at this
    model's relative depth (:data:`vislens.analysis.PAPER_LAYERS`).
    """

    def __init__(self, cap: "Capture", layer: int | str | None) -> None:
        from . import plots
        from .analysis import choose_layer

        self.plots: ModuleType = plots  # imported on use: the CLI parser must stay light
        self.cap = cap
        self.label = plots.capture_label(cap)
        #: ``(label, context)`` of every capture compared by the cross-subset figures (this
        #: one first); :func:`write_figures` fills it
        self.subsets: list[tuple[str, _Context]] = [(self.label, self)]
        #: relation-phrase counts for Figure 15's middle panel (``--phrase-stats``), or None
        self.phrase_stats = None
        self._stats: dict[str, "LayerStats"] = {}
        self._mask = cap.box_mask()
        self.base: str | None
        try:
            self.base = plots.baseline_condition(cap)
        except VislensError:
            self.base = None
        self.num_layers = int(cap.attrs["num_layers"])
        self.fixed: int | None = None
        self.choice = None
        if layer == "best":
            if not self.base_done() or self._mask is None:
                raise VislensError(f"{cap.path}: --layer best needs a baseline condition and a "
                                   "box mask (vislens boxes FILE)")
            self.choice = choose_layer(self.base_stats())
            if self.choice is None:
                raise VislensError(f"{cap.path}: --layer best needs validation and test samples "
                                   "with both correct and wrong baseline answers (capture with "
                                   "--split all); give --layer N instead")
            self.fixed = self.choice.layer
        elif layer is not None:
            self.fixed = plots.check_layer(layer, self.num_layers, cap.path, "--layer")

    def layer_for(self, number: int) -> int:
        """The layer figure ``number`` is drawn at (the first of Figure 6's two)."""
        return self.fixed if self.fixed is not None else self.layers_for(number)[0]

    def layers_for(self, number: int) -> list[int]:
        if self.fixed is not None:
            return [self.fixed]
        return paper_figure_layers(self.num_layers)[number]

    def describe(self) -> str:
        """Which layers were used, for the log."""
        if self.choice is not None:
            c = self.choice
            return (f"layer {c.layer}, chosen on {c.n_val} validation samples; Figure 6 on the "
                    f"{c.n_test} test samples, AUROC {c.test_auroc:.3f}")
        if self.fixed is not None:
            return f"layer {self.fixed}"
        return describe_paper_layers(self.num_layers)

    def roc_stats(self) -> "LayerStats":
        """The baseline statistics Figure 6 is drawn from (test samples with ``--layer best``)."""
        from dataclasses import replace

        st = self.base_stats()
        if self.choice is None or st.split is None:
            return st
        keep = st.split == "test"
        cut = {f: getattr(st, f)[keep] for f in ("rows", "correct", "confidence", "relation",
                                                 "image_mass", "text_mass", "attn_sum", "attn_max",
                                                 "entropy", "skewness", "overlap", "overlap_heads",
                                                 "sample_id", "split")
               if getattr(st, f) is not None}
        return replace(st, condition=f"{st.condition}, test split", **cut)

    def base_done(self) -> bool:
        return self.base is not None and bool(self.cap.done(self.base).any())

    def stats(self, condition: str) -> "LayerStats":
        from .analysis import condition_stats

        if condition not in self._stats:
            self._stats[condition] = condition_stats(self.cap, condition, mask=self._mask)
        return self._stats[condition]

    def all_stats(self) -> list["LayerStats"]:
        return [self.stats(c) for c in self.cap.conditions if self.cap.done(c).any()]

    def base_stats(self) -> "LayerStats":
        if self.base is None:
            raise VislensError(f"{self.cap.path}: no baseline condition")
        return self.stats(self.base)

    def subset_stats(self) -> dict[str, "LayerStats"]:
        """Baseline statistics of every compared capture, by subset label."""
        return {label: ctx.base_stats() for label, ctx in self.subsets}

    def subset_tables(self) -> dict[str, object]:
        """Baseline results table of every compared capture, by subset label."""
        out = {}
        for label, ctx in self.subsets:
            if ctx.base is None:
                raise VislensError(f"{ctx.cap.path}: no baseline condition")
            out[label] = ctx.cap.table(conditions=[ctx.base])
        return out


@dataclass(frozen=True)
class FigureSpec:
    """One figure :func:`write_figures` writes: paper number, file stem, how to draw it."""

    number: int
    stem: str
    draw: Callable[[_Context], "Figure"]
    per_layer: bool = False
    #: compares all the capture files given (one subset each) instead of drawing the first
    cross_subset: bool = False

    def filename(self, layer: int, fmt: str) -> str:
        """``figNN_stem[_layerL].fmt``."""
        stem = f"fig{self.number:02d}_{self.stem}" + (f"_layer{layer}" if self.per_layer else "")
        return f"{stem}.{fmt}"


#: every figure :func:`write_figures` knows, keyed by its paper figure number (as text)
FIGURE_SPECS: Registry[FigureSpec] = Registry("figure")

for _spec in (
    FigureSpec(3, "attention_share", lambda c: c.plots.attention_share(c.cap)),
    FigureSpec(4, "add_constant_accuracy", lambda c: c.plots.add_constant_accuracy(c.cap)),
    FigureSpec(5, "heatmaps", lambda c: c.plots.attention_heatmaps(c.cap, c.layer_for(5)),
               per_layer=True),
    FigureSpec(6, "overlap_roc", lambda c: c.plots.overlap_roc(c.roc_stats(), c.layers_for(6),
                                                              dataset=c.label)),
    FigureSpec(7, "variance_and_auroc",
               lambda c: c.plots.variance_and_auroc(c.cap, stats=c.base_stats())),
    FigureSpec(8, "scaling_sweep", lambda c: c.plots.scaling_sweep(c.cap)),
    FigureSpec(9, "smoothing",
               lambda c: c.plots.before_after(c.cap, c.layer_for(9), kind="smooth"), per_layer=True),
    FigureSpec(10, "sharpening",
               lambda c: c.plots.before_after(c.cap, c.layer_for(10), kind="sharpen"), per_layer=True),
    FigureSpec(14, "entropy_skewness",
               lambda c: c.plots.subset_entropy_skewness(c.subset_stats(), c.layer_for(14)),
               per_layer=True, cross_subset=True),
    FigureSpec(15, "confidence_by_relation",
               lambda c: c.plots.relation_familiarity(c.subset_tables(), c.phrase_stats),
               cross_subset=True),
    FigureSpec(26, "attention_logits",
               lambda c: c.plots.attention_logit_distribution(c.cap, c.layer_for(26)),
               per_layer=True),
):
    FIGURE_SPECS.add(str(_spec.number), _spec)
del _spec

#: the paper figure numbers vislens ships (derived from :data:`FIGURE_SPECS`)
FIGURES: tuple[int, ...] = tuple(int(n) for n in FIGURE_SPECS)


def _numbers() -> list[int]:
    """Figure numbers registered now (including any added after import)."""
    return [int(n) for n in FIGURE_SPECS]


def save_figure(fig: "Figure", out_dir: str | os.PathLike, name: str, fmt: str = "png") -> Path:
    """Save ``fig`` as ``out_dir/name.fmt`` in the vislens style; returns the path."""
    from .plots import vislens_style

    if fmt not in FORMATS:
        raise VislensError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(f".{fmt}") else f"{name}.{fmt}")
    with vislens_style():
        fig.savefig(path, format=fmt, metadata=None if fmt != "png" else {"Software": "vislens"})
    return path


def write_figures(capture_path: str | os.PathLike | Sequence[str | os.PathLike],
                  out_dir: str | os.PathLike, *, layer: int | str | None = None, fmt: str = "png",
                  only: Sequence[int] | None = None, phrase_stats: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Write every figure the captures support into ``out_dir``; returns the written paths.

    ``capture_path``: one capture file or several (one per subset, e.g. Controlled_A,
    Controlled_B, COCO_one). The cross-subset figures (14: entropy and skewness; 15: gold
    labels, training phrases and confidence) compare all of them, each labelled by its
    dataset; the other figures are drawn from the first. ``phrase_stats``: a ``vislens
    phrase-stats --out`` table for Figure 15's middle panel (without it the panel says
    what to pass).

    ``layer`` (for the per-layer figures 5, 6, 9, 10, 14, 26) defaults to the paper's
    layers for a 32-layer model (17 for Figures 5, 9, 10 and 14; 17 and 18 for Figure 6; 14
    for Figure 26) at the same relative depth for other models. An int draws all of them at
    that layer; ``"best"`` at the layer whose baseline overlap AUROC is highest on the
    validation samples, with Figure 6 drawn on the test samples. The log says which. ``only``
    restricts to some paper figure numbers. A figure the capture cannot support is skipped
    with one line through ``log``: ``skipped fig04_add_constant_accuracy: ...``; an
    unfinished capture is drawn from its done samples, after one line saying so.
    """
    from .store import open_capture

    paths = ([capture_path] if isinstance(capture_path, (str, os.PathLike))
             else list(capture_path))
    if not paths:
        raise VislensError("no capture file given")
    if fmt not in FORMATS:
        raise VislensError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    known = _numbers()
    wanted = set(known if only is None else only)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise VislensError(f"no figure {unknown[0]} (vislens draws figures "
                           f"{', '.join(map(str, known))})")
    phrases = None
    if phrase_stats is not None and 15 not in wanted:  # nothing would read it
        raise VislensError(f"--phrase-stats {phrase_stats}: it feeds Figure 15's middle panel, "
                           f"which --only {','.join(map(str, sorted(wanted)))} leaves out")
    if phrase_stats is not None:
        from .plots import read_phrase_stats

        phrases = read_phrase_stats(phrase_stats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with ExitStack() as stack:
        caps = [stack.enter_context(open_capture(p)) for p in paths]
        for p, cap in zip(paths, caps):
            if not cap.complete:
                from .analysis import samples_note

                log(f"{p}: {samples_note(cap)}; figures use the done samples")
        ctx = _Context(caps[0], layer)
        ctx.phrase_stats = phrases
        if len(caps) > 1 and any(FIGURE_SPECS.get(str(n)).cross_subset for n in wanted):
            from .plots import subset_labels

            labels = subset_labels(caps)
            ctx.label = labels[0]
            ctx.subsets = [(labels[0], ctx)] + [(lab, _Context(c, None))
                                                 for lab, c in zip(labels[1:], caps[1:])]
            log(f"comparing {len(caps)} subsets in the cross-subset figures: {', '.join(labels)}; "
                f"the other figures are drawn from {labels[0]} ({paths[0]})")
        for _, spec in FIGURE_SPECS.items():
            if spec.number not in wanted:
                continue
            name = spec.filename(ctx.layer_for(spec.number) if spec.per_layer else 0, fmt)
            try:
                fig = spec.draw(ctx)
            except VislensError as exc:
                log(f"skipped {Path(name).stem}: {str(exc).splitlines()[0]}")
                continue
            written.append(save_figure(fig, out, name, fmt))
            fig.clear()
    log(f"wrote {len(written)} figure(s) to {out} ({ctx.describe()})")
    return written


# ----------------------------------------------------------------------------- command line

def _figure_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers like 3,5,26, got {text!r}") from None


def _layer_arg(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number or 'best', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``FILE [FILE ...] --out --layer --format --only --phrase-stats`` to ``parser``
    (the ``vislens figures`` subcommand); ``args.file`` is the list of capture files."""
    parser.add_argument("file", metavar="FILE.h5", nargs="+",
                        help="capture file(s), one per subset: Figs. 14 and 15 compare them all "
                             "(labelled by dataset); the other figures are drawn from the first")
    parser.add_argument("--out", default="figures", help="output folder (default: figures/)")
    parser.add_argument("--layer", type=_layer_arg, default=None, metavar="N|best",
                        help="layer of the per-layer figures (default: the paper's layers, 17 "
                             "(18 too for Fig. 6) and 14 for Fig. 26 of 32, at the same relative "
                             "depth for other models); a negative N counts from the end (-1 = "
                             "the last layer); 'best': chosen on the validation split, Fig. 6 on "
                             "the test split")
    add_force_argument(parser)
    parser.add_argument("--format", default="png", choices=FORMATS, help="file format (default: png)")
    parser.add_argument("--only", type=_figure_list, default=None, metavar="N,N,...",
                        help=f"only these paper figures (of {','.join(map(str, _numbers()))})")
    parser.add_argument("--phrase-stats", default=None, metavar="FILE",
                        help="relation-phrase counts for Fig. 15's middle panel: the CSV (or JSON) "
                             "of vislens phrase-stats CONVERSATIONS.json --out FILE")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run from parsed :func:`add_arguments` arguments (VislensError propagates)."""
    from .io import prepare_output_dir

    prepare_output_dir(args.out, force=args.force)
    write_figures(args.file, args.out, layer=args.layer, fmt=args.format, only=args.only,
                  phrase_stats=args.phrase_stats)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``vislens figures`` as a function: 0 on success, 2 (one error line) on bad input."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="vislens figures", description="Draw the paper's figures from a capture file."))
    from .jobs import refuse_repeats

    from .io import unclaim_on_failure

    args = refuse_repeats(parser).parse_args(argv)
    try:
        with unclaim_on_failure():
            return run(args)
    except VislensError as exc:
        print(f"vislens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
