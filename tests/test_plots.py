"""Figures (vislens.plots) and `vislens figures` (vislens.figures) on synthetic captures.

The captures are written directly with CaptureWriter (no model): attention is a softmax of
known logits, correct answers look at the object boxes in the middle layers and incorrect
ones elsewhere, so AUROC, ROC and the before/after figures have a known answer.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vislens.io import MARKER

os.environ.setdefault("MPLBACKEND", "Agg")

from vislens import figures, plots  # noqa: E402
from vislens.boxes import box_mask  # noqa: E402
from vislens.conditions import Condition, ConditionResult, parse_condition  # noqa: E402
from vislens.data.base import Box, Sample  # noqa: E402
from vislens.errors import VislensError  # noqa: E402
from vislens.store import CaptureWriter, open_capture  # noqa: E402

L, H, G = 5, 3, 8
W_IMG, H_IMG = 64, 48  # not square: the grid is laid over the whole image
FOCUS_LAYER = 2  # where correct answers look at the objects
RELATIONS = ("left", "right", "on", "under")
OPTIONS = ["Left", "Right", "On", "Under"]
ALL_CONDITIONS = ("baseline", "scaling:0.5", "scaling:2", "add:-1", "add:1", "adaptvis")


def _cond(spec: str) -> Condition:
    """``scaling:0.5`` / ``add:-1`` / ``adaptvis`` / ``baseline`` -> the real condition."""
    if spec == "adaptvis":
        return parse_condition("adaptvis:alpha1=0.5,alpha2=2,beta=0.5")
    if spec.startswith("adaptvis:"):
        return parse_condition(spec)
    method, _, value = spec.partition(":")
    key = {"scaling": "alpha", "add": "delta"}.get(method)
    return parse_condition(f"{method}:{key}={value}" if key else method)


def _boxes(rel: str, rng: np.random.Generator) -> list[Box]:
    s = 12
    x, y = int(rng.integers(4, 14)), int(rng.integers(4, 12))
    if rel in ("left", "right"):
        a, b = (x, y, x + s, y + s), (x + 26, y + 4, x + 26 + s, y + 4 + s)
    else:
        a, b = (x + 10, y, x + 10 + s, y + s), (x + 10, y + 18, x + 10 + s, y + 18 + s)
    if rel in ("right", "under"):
        a, b = b, a
    return [Box("cube", tuple(map(float, a))), Box("ball", tuple(map(float, b)))]


def make_capture(path: Path, *, n: int = 32, conditions=ALL_CONDITIONS, with_boxes: bool = True,
                 with_images: bool = True, all_correct: bool = False, tokens: bool = True,
                 attrs: dict | None = None, seed: int = 0, finalize: bool = True) -> Path:
    """Write a complete synthetic capture file at ``path``; returns ``path``. With
    ``finalize=False`` it stays a working file (every row done, not compacted), as a job
    leaves it before its last step."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    conds = [_cond(c) for c in conditions]
    img_dir = path.parent / f"{path.stem}-images"
    img_dir.mkdir(parents=True, exist_ok=True)
    samples, boxes, masks = [], [], []
    for i in range(n):
        rel = RELATIONS[i % 4]
        bx = _boxes(rel, rng)
        image_path = img_dir / f"s{i}.png"
        if with_images:
            im = Image.new("RGB", (W_IMG, H_IMG), (200, 200, 190))
            d = ImageDraw.Draw(im)
            d.rectangle(bx[0].xyxy, fill=(200, 40, 40))
            d.ellipse(bx[1].xyxy, fill=(40, 40, 200))
            im.save(image_path)
        samples.append(Sample(id=f"s{i:03d}", image_path=str(image_path),
                              question=f"Where is the cube in relation to the ball? Answer with "
                                       f"left, right, on or under.",
                              options=list(OPTIONS), answer=rel.capitalize(), relation=rel,
                              group=f"g{i // 4}", objects=["cube", "ball"], boxes=bx))
        boxes.append(bx)
        masks.append(box_mask(np.array([b.xyxy for b in bx]), (W_IMG, H_IMG), G))
    masks = np.stack(masks)
    correct = np.ones(n, bool) if all_correct else (rng.random(n) < 0.55)
    if not all_correct:
        correct[:2] = [True, False]
    # logits [n, L, H, G, G]: noise + focus on the mask (correct) or on a distractor (incorrect)
    focus = np.where(np.arange(L) == FOCUS_LAYER, 1.0, 0.08)
    distract = np.zeros((n, G, G))
    for i in range(n):
        r, c = rng.integers(0, G, 2)
        distract[i, r, c] = 1.0
    target = np.where(correct[:, None, None], masks, distract)
    z = rng.normal(0, 0.7, (n, L, H, G, G)) + 4.0 * focus[None, :, None, None, None] * target[:, None, None]
    base_mass = 0.1 + 0.05 * rng.random((n, L, H))
    flip = rng.random((len(conds), n)) < 0.25
    conf = np.where(correct, 0.55 + 0.4 * rng.random(n), 0.25 + 0.4 * rng.random(n))

    def result(i: int, k: int, c: Condition) -> tuple[ConditionResult, bool]:
        p = dict(c.params)
        alpha = p.get("alpha", 1.0) if c.method == "scaling" else 1.0
        delta = p.get("delta", 0.0) if c.method == "add" else 0.0
        w = np.exp(alpha * z[i])
        w /= w.sum(axis=(-1, -2), keepdims=True)
        mass = base_mass[i] * np.exp(delta) / (base_mass[i] * np.exp(delta) + 1 - base_mass[i])
        ok = bool(correct[i]) if c.method == "baseline" or all_correct else bool(correct[i] ^ flip[k, i])
        gold = OPTIONS.index(samples[i].answer)
        pred = gold if ok else (gold + 1) % 4
        probs = np.full(4, 0.05, np.float32)
        probs[pred] = conf[i]
        r = ConditionResult(n_image_tokens=G * G, n_text_tokens=20, text=OPTIONS[pred], first_token=pred, confidence=float(conf[i]) * (0.8 + 0.4 * alpha / 2),
                   option_probs=probs, alpha_used=alpha, image_attention=(w * mass[..., None, None]).astype(np.float32),
                   image_mass=mass.astype(np.float32), text_mass=(1 - mass).astype(np.float32),
                   # the logits the attention came from (one per cell), after the intervention
                   image_logit_mean=(alpha * z[i] + delta).mean(axis=(-1, -2)).astype(np.float32),
                   image_logit_max=(alpha * z[i] + delta).max(axis=(-1, -2)).astype(np.float32))
        if not tokens:
            r.n_image_tokens = r.n_text_tokens = 0
        return r, ok

    path.unlink(missing_ok=True)
    w = CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L, num_heads=H,
                           num_options=4,
                           attrs={"model": "synthetic", "dataset": "synthetic", **(attrs or {})},
                           sizes=[(W_IMG, H_IMG)] * n, box_masks=masks if with_boxes else None,
                           boxes=boxes if with_boxes else None)
    try:
        for start in range(0, n, 16):
            rows = list(range(start, min(n, start + 16)))
            res, cor = [], []
            for i in rows:
                out = {c.name: result(i, k, c) for k, c in enumerate(conds)}
                res.append({name: r for name, (r, _) in out.items()})
                cor.append({name: ok for name, (_, ok) in out.items()})
            w.write_batch(rows, res, cor)
        if finalize:
            w.finalize()
    finally:
        w.close()
    return path


@pytest.fixture(scope="module")
def caps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plots")
    return {
        "full": make_capture(root / "full.h5"),
        "bare": make_capture(root / "bare.h5", conditions=("baseline", "scaling:2"), with_boxes=False,
                             with_images=False, tokens=False, n=12),
        "allright": make_capture(root / "allright.h5", conditions=("baseline",), all_correct=True, n=8),
    }


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _texts(fig) -> str:
    out = [fig._suptitle.get_text() if fig._suptitle else ""]
    for sf in getattr(fig, "subfigs", []):
        out.append(sf._suptitle.get_text() if sf._suptitle else "")
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    out += [t.get_text() for t in fig.texts]
    for leg in fig.legends:
        out += [t.get_text() for t in leg.get_texts()]
    return "\n".join(out)


# ----------------------------------------------------------------------------- every figure


def test_attention_share(caps):
    fig = plots.attention_share(caps["full"])
    ax, bx = _axes(fig)
    assert ax.get_xlabel() == "layer" and "%" in ax.get_ylabel()
    assert len(ax.lines) == 2  # attention share per layer + token share
    assert np.allclose(ax.lines[0].get_xdata(), np.arange(L))
    token = ax.lines[1].get_ydata()[0]
    assert token == pytest.approx(100 * G * G / (G * G + 20), abs=0.01)
    assert "of the prompt" in fig._suptitle.get_text()
    assert len(bx.patches) == 2


def test_attention_share_without_token_counts(caps):
    fig = plots.attention_share(caps["bare"])
    ax, _ = _axes(fig)
    assert len(ax.lines) == 1
    assert "token share not drawn" in fig._suptitle.get_text()
    fig = plots.attention_share(caps["bare"], n_text_tokens=36)  # image tokens default to G*G
    ax, _ = _axes(fig)
    assert ax.lines[1].get_ydata()[0] == pytest.approx(100 * 64 / 100)


def test_attention_share_token_counts_from_root_attrs(tmp_path):
    path = make_capture(tmp_path / "attrs.h5", n=4, conditions=("baseline",), tokens=False,
                        attrs={"n_image_tokens": 576, "n_text_tokens": 24})
    with open_capture(path) as cap:
        ni, nt, origin = plots.token_counts(cap)
    assert (ni, nt) == (576, 24) and "attr n_text_tokens" in origin
    ax, _ = _axes(plots.attention_share(path))
    assert ax.lines[1].get_ydata()[0] == pytest.approx(96.0)


def test_colour_maps_read_in_greyscale():
    import inspect

    src = inspect.getsource(plots).lower()
    assert plots.CMAP in ("viridis", "cividis", "magma", "inferno", "plasma")
    for name in ("jet", "rainbow", "hsv", "gist_rainbow", "nipy_spectral"):
        assert f'"{name}"' not in src and f"'{name}'" not in src


def test_add_constant_accuracy(caps):
    fig = plots.add_constant_accuracy(caps["full"])
    (ax,) = _axes(fig)
    assert ax.get_xscale() == "log"
    assert "e^δ" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    line = ax.lines[0]
    assert np.allclose(sorted(line.get_xdata()), np.exp([-1, 0, 1]))
    with open_capture(caps["full"]) as cap:
        acc = cap.table(conditions=["baseline"])["correct"].mean() * 100
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert y[np.argmin(abs(x - 1))] == pytest.approx(acc)  # baseline at e^0 = 1


def test_attention_heatmaps(caps):
    fig = plots.attention_heatmaps(caps["full"], FOCUS_LAYER, n_examples=3)
    panels = _axes(fig)
    assert len(panels) == 6 and len(fig.axes) == 7  # 2 outcomes x 3 examples + colour bar
    assert "share of the image attention" in fig.axes[-1].get_ylabel()
    for ax in panels:
        underlay, heat = ax.get_images()
        assert heat.get_cmap().name == plots.CMAP
        assert tuple(heat.get_extent()) == (0, W_IMG, H_IMG, 0)  # grid over the whole image
        assert heat.get_array().shape == (G, G)
        assert len(ax.patches) == 2  # the two object boxes
        assert "Where is the cube" in ax.get_title()
    assert panels[0].get_ylabel() == "correct answers" and panels[3].get_ylabel() == "incorrect answers"


def test_heatmaps_without_images_or_boxes(caps):
    fig = plots.attention_heatmaps(caps["bare"], 1, n_examples=2)
    for ax in _axes(fig):
        assert len(ax.get_images()) == 1 and len(ax.patches) == 0
        assert "image not found" in [t.get_text() for t in ax.texts]


def test_overlap_roc_and_best_layers(caps):
    assert plots.best_layers(caps["full"], 1) == [FOCUS_LAYER]
    assert plots.default_layer(caps["full"]) == FOCUS_LAYER
    fig = plots.overlap_roc(caps["full"])
    axes = _axes(fig)
    assert len(axes) == 2 and axes[0].get_title() == f"layer {FOCUS_LAYER}"
    assert "AUROC" in _texts(fig) and "false positive rate" in axes[0].get_xlabel()
    fig = plots.overlap_roc(caps["full"], [0, 1, 4])
    assert [a.get_title() for a in _axes(fig)] == ["layer 0", "layer 1", "layer 4"]


def test_overlap_roc_from_stats(caps):
    from vislens.analysis import all_stats

    stats = all_stats(caps["full"], ["baseline", "scaling-2"])
    fig = plots.overlap_roc(stats, condition="scaling-2")
    assert "scaling-2" in fig._suptitle.get_text()


def test_report_helpers(caps):
    """vislens.report draws its per-layer AUROC and ROC figures with these."""
    from vislens.analysis import all_stats, per_layer_auroc_table

    stats = all_stats(caps["full"], ["baseline", "scaling-2"])
    fig = plots.plot_layer_auroc(per_layer_auroc_table(stats))
    (ax,) = _axes(fig)
    assert len(ax.lines) == 3 and ax.get_xlabel() == "layer"  # chance + 2 conditions
    assert [a.get_title() for a in _axes(plots.plot_roc_layers(stats[0], [2, 4]))] == ["layer 2", "layer 4"]
    with pytest.raises(VislensError, match="no defined per-layer AUROC"):
        plots.plot_layer_auroc(per_layer_auroc_table(all_stats(caps["allright"])))


def test_variance_and_auroc(caps):
    fig = plots.variance_and_auroc(caps["full"])
    ax, bx = _axes(fig)
    assert ax.get_xlabel() == bx.get_xlabel() == "layer"
    assert "variance" in ax.get_ylabel() and "AUROC" in bx.get_ylabel()
    curve = bx.lines[-1]
    assert int(np.argmax(curve.get_ydata())) == FOCUS_LAYER
    rows, var = plots.cell_variance(caps["full"])
    assert var.shape == (32, L) and np.all(var >= 0)
    # correct answers are concentrated on the boxes at the focus layer
    fig = plots.variance_and_auroc(caps["bare"])  # no mask: the AUROC panel says why
    assert "box mask" in _texts(fig)


def test_scaling_sweep(caps):
    fig = plots.scaling_sweep(caps["full"])
    ax, bx = _axes(fig)
    assert ax.get_xscale() == "log" and "α" in ax.get_xlabel()
    assert "accuracy" in ax.get_ylabel() and "confidence" in bx.get_ylabel()
    data_lines = [ln for ln in ax.lines if len(ln.get_xdata()) == 3 and ln.get_linestyle() != "None"]
    assert len(data_lines) == 1 + len(RELATIONS)  # all + one per relation
    assert np.allclose(data_lines[0].get_xdata(), [0.5, 1, 2])
    # relation lines are nudged sideways (their error bars must not overlap), by < 5%
    assert all(np.allclose(ln.get_xdata(), [0.5, 1, 2], rtol=0.05) for ln in data_lines[1:])
    assert "AdaptVis" in _texts(fig)


@pytest.mark.parametrize("kind,alpha", [("smooth", "0.5"), ("sharpen", "2")])
def test_before_after(caps, kind, alpha):
    fig = plots.before_after(caps["full"], FOCUS_LAYER, kind=kind, n_examples=3)
    panels = _axes(fig)
    assert len(panels) == 6 and len(fig.axes) == 9  # 3 examples x (before, after) + 3 colour bars
    titles = [a.get_title() for a in panels]
    assert all(t.startswith("baseline") for t in titles[::2])
    assert all(f"ScalingVis α={alpha}" in t for t in titles[1::2])
    before, after = (np.asarray(panels[i].get_images()[-1].get_array()) for i in (0, 1))
    peak = lambda m: np.nanmax(m) / np.nanmean(m)  # noqa: E731
    assert (peak(after) < peak(before)) if kind == "smooth" else (peak(after) > peak(before))


def test_entropy_skewness(caps):
    fig = plots.entropy_skewness(caps["full"], FOCUS_LAYER)
    ax, bx = _axes(fig)
    assert "entropy" in ax.get_ylabel() and "nats" in ax.get_ylabel() and "skewness" in bx.get_ylabel()
    assert bx.get_xlabel() == "condition"
    assert [t.get_text() for t in bx.get_xticklabels()] == ["baseline", "scaling-0.5", "scaling-2",
                                                           "add-1", "add+1", "adaptvis"]
    assert len(ax.patches) >= 6


def test_confidence_by_relation(caps):
    fig = plots.confidence_by_relation(caps["full"])
    (ax,) = _axes(fig)
    labels = " ".join(t.get_text() for t in ax.get_xticklabels())
    assert all(r in labels for r in RELATIONS)
    assert "confidence" in ax.get_ylabel() and ax.get_xlabel() == "gold relation"
    with open_capture(caps["full"]) as cap:
        fig = plots.confidence_by_relation(cap.table(), condition="scaling-2")
    assert "scaling-2" in fig._suptitle.get_text()


def test_log_attention_distribution_scales_with_alpha(caps):
    fig = plots.log_attention_distribution(caps["full"], 0)
    (ax,) = _axes(fig)
    assert "log w" in ax.get_xlabel() and "logit" in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    sd = {t.split(" (")[0]: float(t.rsplit("sd ", 1)[1].rstrip(")")) for t in legend}
    # ScalingVis multiplies image logits by alpha: the centred log weights scale by alpha
    assert sd["ScalingVis α=0.5"] / sd["baseline"] == pytest.approx(0.5, rel=0.03)
    assert sd["ScalingVis α=2"] / sd["baseline"] == pytest.approx(2.0, rel=0.03)


def test_attention_logit_distribution_shifts_with_alpha_and_marks_corrections(caps):
    layer = 1
    fig = plots.attention_logit_distribution(caps["full"], layer)
    ax, bx = _axes(fig)
    assert "mean" in ax.get_xlabel() and "max" in bx.get_xlabel()
    with open_capture(caps["full"]) as cap:
        tab = cap.table(conditions=["baseline", "scaling-0.5", "scaling-2"])
        mx = {n: cap.image_logits(n)[1][:, layer].max(-1) for n in ("baseline", "scaling-0.5", "scaling-2")}
    ok = tab.pivot(index="row", columns="condition", values="correct")
    means = {}
    for axis, name in ((bx, "max"), (ax, "mean")):
        legend = [t.get_text() for t in axis.get_legend().get_texts()]
        assert [t.split(" (")[0] for t in legend] == ["baseline", "ScalingVis α=0.5", "ScalingVis α=2"]
        mean = {t.split(" (")[0]: float(t.split("(mean ")[1].split(")")[0]) for t in legend}
        means[name] = mean
        # ScalingVis multiplies the image logits by alpha: the lines move by that factor
        assert mean["ScalingVis α=0.5"] / mean["baseline"] == pytest.approx(0.5, rel=0.02)
        assert mean["ScalingVis α=2"] / mean["baseline"] == pytest.approx(2.0, rel=0.02)
        for text, cond in zip(legend[1:], ("scaling-0.5", "scaling-2")):
            fixed = int((~ok["baseline"].astype(bool) & ok[cond].astype(bool)).sum())
            assert text.endswith(f", {fixed} corrected")
    # the max panel's baseline line is the per-sample max over heads of the stored maxima
    assert means["max"]["baseline"] == pytest.approx(float(np.mean(mx["baseline"])), rel=5e-3)
    ticks = [ln for ln in bx.get_lines() if ln.get_marker() == "|"]
    assert sum(len(ln.get_xdata()) for ln in ticks) == sum(
        int((~ok["baseline"].astype(bool) & ok[c].astype(bool)).sum()) for c in ("scaling-0.5", "scaling-2"))


def test_centred_log_attention_drops_zeros():
    w = np.array([[[0.5, 0.25], [0.25, 0.0]]], dtype=np.float32)
    v = plots.centred_log_attention(w)
    assert v.size == 3 and abs(v.mean()) < 1e-12


def test_figures_do_not_touch_pyplot(caps):
    import matplotlib.pyplot as plt

    plots.attention_share(caps["full"])
    plots.scaling_sweep(caps["full"])
    assert plt.get_fignums() == []


# ----------------------------------------------------------------------------- graceful failure


def test_missing_inputs_raise_one_line_errors(caps):
    cases = [
        (lambda: plots.add_constant_accuracy(caps["bare"]), "no 'add' conditions"),
        (lambda: plots.overlap_roc(caps["bare"]), "no object box mask"),
        (lambda: plots.overlap_roc(caps["allright"]), "AUROC undefined, all 8 answers are correct"),
        (lambda: plots.scaling_sweep(caps["allright"]), "no 'scaling' conditions"),
        (lambda: plots.before_after(caps["bare"], kind="smooth"), "alpha < 1"),
        (lambda: plots.log_attention_distribution(caps["allright"]), "nothing to compare"),
        (lambda: plots.attention_heatmaps(caps["full"], layer=L), f"layer {L} out of range"),
        (lambda: plots.attention_share(caps["full"], condition="nope"), "no condition 'nope'"),
        (lambda: plots.attention_share("/nonexistent/x.h5"), "no such capture file"),
    ]
    for call, text in cases:
        with pytest.raises(VislensError, match=text) as info:
            call()
        assert "\n" not in str(info.value)


def test_single_class_still_draws_what_it_can(caps):
    assert plots.default_layer(caps["allright"]) == L // 2
    fig = plots.attention_heatmaps(caps["allright"], n_examples=2)
    assert len(_axes(fig)) == 2 and "no incorrect answers" in fig._suptitle.get_text()
    fig = plots.variance_and_auroc(caps["allright"])
    assert "AUROC undefined" in " ".join(_texts(fig).split())


# ----------------------------------------------------------------------------- write_figures / CLI


def test_write_figures_all(caps, tmp_path):
    from vislens.analysis import paper_layer

    notes: list[str] = []
    paths = figures.write_figures(caps["full"], tmp_path / "figs", log=notes.append)
    names = sorted(p.name for p in paths)
    lay, lay26 = paper_layer(17, L), paper_layer(14, L)  # the paper's layers at this depth
    assert (lay, lay26) == (3, 2)
    assert names == sorted([
        "fig03_attention_share.png", "fig04_add_constant_accuracy.png", f"fig05_heatmaps_layer{lay}.png",
        "fig06_overlap_roc.png", "fig07_variance_and_auroc.png", "fig08_scaling_sweep.png",
        f"fig09_smoothing_layer{lay}.png", f"fig10_sharpening_layer{lay}.png",
        f"fig14_entropy_skewness_layer{lay}.png", "fig15_confidence_by_relation.png",
        f"fig26_attention_logits_layer{lay26}.png"])
    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    assert notes == [f"wrote 11 figure(s) to {tmp_path / 'figs'} (the paper's layers at this "
                     f"model's depth ({L} layers): Figs. 5, 9, 10, 14 layer 3, Fig. 6 layers 3, "
                     f"Fig. 26 layer 2)"]


def test_write_figures_skips_what_is_missing(caps, tmp_path):
    notes: list[str] = []
    paths = figures.write_figures(caps["bare"], tmp_path, log=notes.append)
    skipped = {n.split(":")[0] for n in notes if n.startswith("skipped")}
    assert skipped == {"skipped fig04_add_constant_accuracy", "skipped fig06_overlap_roc",
                       "skipped fig09_smoothing_layer3"}
    assert all("\n" not in n for n in notes)
    assert {p.name for p in paths} >= {"fig03_attention_share.png", "fig05_heatmaps_layer3.png",
                                       "fig10_sharpening_layer3.png", "fig26_attention_logits_layer2.png"}


def test_main_cli(caps, tmp_path, capsys):
    out = tmp_path / "pdf"
    assert figures.main([str(caps["full"]), "--out", str(out), "--layer", "1", "--format", "pdf",
                         "--only", "3,5"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["fig03_attention_share.pdf",
                                                                          "fig05_heatmaps_layer1.pdf"]
    assert (out / "fig03_attention_share.pdf").read_bytes()[:4] == b"%PDF"
    assert figures.main([str(tmp_path / "missing.h5"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vislens: error:") and "missing.h5" in err[0]
    assert figures.main([str(caps["full"]), "--out", str(out), "--layer", "99"]) == 2
    assert figures.main([str(caps["full"]), "--out", str(out), "--only", "2"]) == 2


def test_a_negative_layer_counts_from_the_end(caps, tmp_path, capsys):
    """``--layer -1`` is the last layer (as the help says); one before the first is a one-line
    error naming the flag and the value given."""
    out = tmp_path / "neg"
    assert figures.main([str(caps["full"]), "--out", str(out), "--layer", "-1", "--only", "5"]) == 0
    assert [p.name for p in out.iterdir() if p.name != MARKER] == [f"fig05_heatmaps_layer{L - 1}.png"]
    assert figures.main([str(caps["full"]), "--out", str(out), "--layer", f"-{L}", "--only", "5",
                         "--force"]) == 0
    assert (out / "fig05_heatmaps_layer0.png").exists()
    capsys.readouterr()
    assert figures.main([str(caps["full"]), "--out", str(out), "--layer", f"-{L + 1}", "--only", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vislens: error: ")
    assert f"--layer -{L + 1} out of range" in err[0] and f"-{L} to -1 from the end" in err[0]
    import argparse

    helps = {a.dest: a.help for a in figures.add_arguments(argparse.ArgumentParser())._actions}
    assert "-1 = the last layer" in helps["layer"]


def test_add_arguments_parses_subcommand():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    figures.add_arguments(sub.add_parser("figures"))
    args = p.parse_args(["figures", "x.h5", "--out", "o", "--layer", "17", "--format", "pdf"])
    assert (args.file, args.out, args.layer, args.format, args.only) == (["x.h5"], "o", 17, "pdf", None)
    args = p.parse_args(["figures", "a.h5", "b.h5", "--phrase-stats", "p.csv"])
    assert args.file == ["a.h5", "b.h5"] and args.phrase_stats == "p.csv"


def test_resolve_paths(caps, tmp_path, monkeypatch):
    from vislens import notebook, paths

    monkeypatch.setenv("VISLENS_CAPTURE", str(caps["bare"]))
    monkeypatch.setenv("VISLENS_FIGURES_DIR", str(tmp_path / "f"))
    assert notebook.resolve_capture() == caps["bare"]
    assert notebook.resolve_figures_dir() == tmp_path / "f" and (tmp_path / "f").is_dir()
    monkeypatch.setenv("VISLENS_CAPTURE", str(tmp_path / "nope.h5"))
    with pytest.raises(VislensError, match="no such capture file"):
        notebook.resolve_capture()
    root = Path(figures.__file__).resolve().parents[1]
    assert paths.repo_root() == root and (root / "pyproject.toml").is_file()
    assert paths.organism_path() == root / "data" / "organism"


def test_a_registered_figure_needs_no_other_edit(caps, tmp_path, monkeypatch):
    """A figure added to the registry is drawn, listed in --help and accepted by --only."""
    import argparse

    import matplotlib.pyplot as plt

    from vislens.registry import Registry

    registry = Registry("figure")
    for name, spec in figures.FIGURE_SPECS.items():
        registry.add(name, spec)
    monkeypatch.setattr(figures, "FIGURE_SPECS", registry)
    drawn = []

    def draw(ctx):
        drawn.append(ctx.cap.path)
        return plt.figure()

    registry.add("99", figures.FigureSpec(99, "mine", draw))
    paths = figures.write_figures(caps["bare"], tmp_path, only=[99], log=lambda m: None)
    assert [p.name for p in paths] == ["fig99_mine.png"] and drawn == [caps["bare"]]
    parser = figures.add_arguments(argparse.ArgumentParser())
    assert "26,99" in parser.format_help().replace("\n", "").replace(" ", "")
    with pytest.raises(VislensError, match=r"no figure 98 \(vislens draws figures 3, 4, .*26, 99\)"):
        figures.write_figures(caps["bare"], tmp_path, only=[98])


# ----------------------------------------------------------------------------- readability


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval from its formula (not scipy's binomtest), in %."""
    from scipy.stats import norm

    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def _errorbar_ranges(container) -> np.ndarray:
    """``[n, 2]`` (low, high) of an errorbar container's vertical bars."""
    segs = container.lines[2][0].get_segments()
    return np.array([[s[:, 1].min(), s[:, 1].max()] for s in segs])


def test_accuracy_interval_is_wilson():
    for k, n in ((0, 7), (3, 7), (7, 7), (41, 57)):
        acc, lo, hi, nn = plots.accuracy_interval(np.arange(n) < k)
        assert nn == n and acc == pytest.approx(100 * k / n)
        assert (lo, hi) == pytest.approx(_wilson_by_hand(k, n), rel=1e-9, abs=1e-9)
    assert np.isnan(plots.accuracy_interval([])[0])


def test_add_constant_accuracy_wilson_bars(caps):
    """Fig. 4's error bars are the (asymmetric) Wilson interval of each condition's accuracy."""
    fig = plots.add_constant_accuracy(caps["full"])
    (ax,) = _axes(fig)
    with open_capture(caps["full"]) as cap:
        tab = cap.table()
    by_delta = {-1.0: "add-1", 0.0: "baseline", 1.0: "add+1"}
    line = ax.containers[0]
    x = np.asarray(line.lines[0].get_xdata())
    ranges = _errorbar_ranges(line)
    for xi, (lo, hi) in zip(x, ranges):
        c = tab.loc[tab["condition"] == by_delta[round(float(np.log(xi)))], "correct"]
        assert (lo, hi) == pytest.approx(_wilson_by_hand(int(c.sum()), len(c)), rel=1e-6)
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 100  # 0% and 100% stay visible


def test_scaling_sweep_wilson_and_margins(caps):
    fig = plots.scaling_sweep(caps["full"])
    ax, bx = _axes(fig)
    for a in (ax, bx):
        lo, hi = a.get_ylim()
        assert lo < 0 and hi > 100, "lines at 0% and 100% must not sit on the frame"
    with open_capture(caps["full"]) as cap:
        tab = cap.table()
    alpha = {"scaling-0.5": 0.5, "baseline": 1.0, "scaling-2": 2.0}
    # overall band: its polygon's top/bottom at each alpha are the Wilson bounds
    band = next(c for c in ax.collections if "Wilson" in str(c.get_label()))
    verts = band.get_paths()[0].vertices
    for cond, a in alpha.items():
        c = tab.loc[tab["condition"] == cond, "correct"]
        ys = verts[np.isclose(verts[:, 0], a), 1]
        assert (ys.min(), ys.max()) == pytest.approx(_wilson_by_hand(int(c.sum()), len(c)), rel=1e-6)
    # per-relation error bars
    rel = "under"
    cont = next(c for c in ax.containers if str(c.get_label()).startswith(f"{rel} "))
    got = _errorbar_ranges(cont)
    for (lo, hi), cond in zip(got, ["scaling-0.5", "baseline", "scaling-2"]):
        c = tab.loc[(tab["condition"] == cond) & (tab["relation"] == rel), "correct"]
        assert (lo, hi) == pytest.approx(_wilson_by_hand(int(c.sum()), len(c)), rel=1e-6)


def test_confidence_boxes_clear_the_frame(caps):
    (ax,) = _axes(plots.confidence_by_relation(caps["full"]))
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 100


def test_heatmap_overlay_pixels(caps):
    """A cell with no object: the pixel is the overlay colour of the known map value over the
    faint grey image, composited with the overlay's opacity (an object cannot darken a cell
    by more than (1 - alpha) * UNDERLAY_CONTRAST)."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    row = 5
    fig = plots.attention_heatmaps(caps["full"], FOCUS_LAYER, rows={"correct": [row]})
    ax = _axes(fig)[0]
    underlay, heat = ax.get_images()
    with open_capture(caps["full"]) as cap:
        attn = cap.attention("baseline", rows=[row], layers=[FOCUS_LAYER])[0, 0]
        image_path = cap.samples.iloc[row]["image_path"]
    amap = attn.mean(axis=0) / attn.mean(axis=0).sum() * 100  # head mean, % of image attention
    assert np.allclose(heat.get_array(), amap, rtol=1e-5)
    grey = np.asarray(Image.open(image_path).convert("L"), dtype=float) / 255
    bg = grey[-1, -1]  # the background in the bottom-right cell (no object there)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    buf = np.asarray(canvas.buffer_rgba(), dtype=float)[..., :3] / 255
    cell = W_IMG / G, H_IMG / G
    x, y = ax.transData.transform(((G - 0.5) * cell[0], (G - 0.5) * cell[1]))
    pixel = buf[int(round(buf.shape[0] - y)), int(round(x))]
    rgb = np.array(mpl.colormaps[plots.CMAP](heat.norm(amap[-1, -1]))[:3])
    faint = 1 - plots.UNDERLAY_CONTRAST * (1 - bg)
    expected = plots.OVERLAY_ALPHA * rgb + (1 - plots.OVERLAY_ALPHA) * faint
    assert pixel == pytest.approx(expected, abs=2.5 / 255)
    assert np.allclose(plots.faint_image(np.array([0.0, 1.0])), [1 - plots.UNDERLAY_CONTRAST, 1.0])


def test_dataset_labels():
    cases = {"jsonl:/tmp/x/scenes/controlled_a.jsonl": "Controlled_A", "whatsup:coco_two": "COCO_two",
             "vsr:test": "VSR test", "jsonl:my/questions.jsonl": "questions", "synthetic": "synthetic"}
    for spec, want in cases.items():
        assert plots.dataset_label(spec) == want
    assert plots.dataset_label("", "/a/run7.h5") == "run7"
    assert plots.relation_group("on top of") == "On etc" and plots.relation_group("Under") == "Under etc"
    assert plots.relation_group("in front of") == "front" and plots.relation_group("near") == "other"


@pytest.fixture(scope="module")
def subsets(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("subsets")
    return [make_capture(root / "a.h5", n=12, conditions=("baseline",), seed=1,
                         attrs={"dataset": f"jsonl:{root}/scenes/controlled_a.jsonl"}),
            make_capture(root / "b.h5", n=16, conditions=("baseline",), seed=2,
                         attrs={"dataset": "whatsup:coco_one"})]


def _eq4_eq5_by_hand(attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, H, G, G] -> per-sample head means of scipy's entropy and Eq. 5 by its formula."""
    from scipy.stats import entropy

    p = attn.reshape(attn.shape[0], attn.shape[1], -1).astype(float)
    p /= p.sum(-1, keepdims=True)
    ent = entropy(p, axis=-1)
    j = np.arange(p.shape[-1])
    mu = (p * j).sum(-1, keepdims=True)
    sd = np.sqrt((p * (j - mu) ** 2).sum(-1))
    skew = (p * (j - mu) ** 3).sum(-1) / sd ** 3
    return ent.mean(-1), skew.mean(-1)


def test_subset_entropy_skewness_matches_per_file_means(subsets):
    fig = plots.subset_entropy_skewness(subsets, FOCUS_LAYER)
    ax, bx = _axes(fig)
    assert "Eq. 5" in bx.get_ylabel() and "positional skewness" in bx.get_ylabel()
    assert "Eq. 4" in ax.get_ylabel()
    ticks = [t.get_text() for t in bx.get_xticklabels()]
    assert ticks[0].startswith("Controlled_A\n") and ticks[1].startswith("COCO_one\n")
    assert "jsonl:" not in _texts(fig)
    ent_means = next(ln for ln in ax.lines if ln.get_label() == "mean").get_ydata()
    skew_means = next(ln for ln in bx.lines if ln.get_label() == "mean").get_ydata()
    for i, path in enumerate(subsets):
        with open_capture(path) as cap:
            attn = cap.attention("baseline", layers=[FOCUS_LAYER])[:, 0]
            correct = cap.table(conditions=["baseline"])["correct"].to_numpy(bool)
        ent, skew = _eq4_eq5_by_hand(attn)
        assert ent_means[i] == pytest.approx(ent.mean(), rel=1e-4)
        assert skew_means[i] == pytest.approx(skew.mean(), rel=1e-3)
        lo, hi = _wilson_by_hand(int(correct.sum()), correct.size)
        assert f"{100 * correct.mean():.0f}% [{lo:.0f}-{hi:.0f}]" in ticks[i]


def test_subset_figures_refuse_mixed_depths(subsets, tmp_path):
    other = make_capture(tmp_path / "deep.h5", n=4, conditions=("baseline",))
    from vislens.analysis import all_stats

    st = all_stats(other)[0]
    st.entropy = np.zeros((st.entropy.shape[0], L + 1))
    st.image_mass = np.zeros((st.image_mass.shape[0], L + 1))
    with pytest.raises(VislensError, match="different depth"):
        plots.subset_entropy_skewness({"a": subsets[0], "deep": st})


def test_relation_familiarity(subsets, tmp_path):
    phr = tmp_path / "phrases.csv"
    phr.write_text("relation,occurrences,records,percent\nleft,30,3,50\nright,20,2,33.3\non,6,1,10\n"
                   "under,4,1,6.7\n")
    fig = plots.relation_familiarity(subsets, phr)
    ax, px, hx = _axes(fig)
    # right: mean baseline confidence per relation group x subset, by hand
    heat = np.ma.filled(hx.get_images()[0].get_array(), np.nan)
    groups = [t.get_text() for t in hx.get_yticklabels()]
    assert groups == ["left", "right", "On etc", "Under etc"]
    for c, path in enumerate(subsets):
        with open_capture(path) as cap:
            t = cap.table(conditions=["baseline"])
        for r, rel in enumerate(["left", "right", "on", "under"]):
            want = 100 * t.loc[t["relation"] == rel, "confidence"].mean()
            assert heat[r, c] == pytest.approx(want, rel=1e-6)  # float32 confidences
    # middle: the phrase counts as given
    assert [b.get_height() for b in px.patches] == [30, 20, 6, 4]
    assert [t.get_text() for t in px.get_xticklabels()] == ["left", "right", "On etc", "Under etc"]
    # left: each subset's label distribution (4 relations, equally often)
    heights = np.array([b.get_height() for b in ax.patches])
    assert np.allclose(heights, 25.0)
    # without phrase counts the middle panel says what to pass
    fig = plots.relation_familiarity(subsets)
    assert "--phrase-stats" in " ".join(_texts(fig).split())


def test_read_phrase_stats_formats_and_errors(tmp_path):
    import json

    (tmp_path / "a.json").write_text(json.dumps({"left": 5, "on": {"occurrences": 2}}))
    assert plots.read_phrase_stats(tmp_path / "a.json")["occurrences"].to_dict() == {"left": 5, "on": 2}
    (tmp_path / "b.json").write_text(json.dumps([{"relation": "under", "occurrences": 3}]))
    assert plots.read_phrase_stats(tmp_path / "b.json").loc["under", "occurrences"] == 3
    (tmp_path / "bad.csv").write_text("relation,count\nleft,3\n")
    for path, text in ((tmp_path / "bad.csv", "needs columns 'relation' and 'occurrences'"),
                       (tmp_path / "none.csv", "no such phrase-stats file")):
        with pytest.raises(VislensError, match=text) as info:
            plots.read_phrase_stats(path)
        assert "\n" not in str(info.value)


def test_write_figures_compares_subsets(subsets, tmp_path, capsys):
    from vislens.phrases import phrase_stats

    phr = tmp_path / "phrases.csv"
    phrase_stats(["the cup is on the left of the bowl, under the lamp"]).to_csv(phr)
    notes: list[str] = []
    paths = figures.write_figures(subsets, tmp_path / "f", only=[14, 15], phrase_stats=phr,
                                  log=notes.append)
    assert sorted(p.name for p in paths) == ["fig14_entropy_skewness_layer3.png",
                                             "fig15_confidence_by_relation.png"]
    assert notes[0].startswith("comparing 2 subsets in the cross-subset figures: Controlled_A, "
                               "COCO_one; the other figures are drawn from Controlled_A")
    out = tmp_path / "cli"
    assert figures.main([str(subsets[0]), str(subsets[1]), "--out", str(out), "--only", "15",
                         "--phrase-stats", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv" in err[0]
    # a phrase table nothing would read is refused, not ignored
    assert figures.main([str(subsets[0]), str(subsets[1]), "--out", str(out), "--only", "14",
                         "--phrase-stats", str(phr)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--phrase-stats" in err[0] and "Figure 15" in err[0]
    assert figures.main([str(subsets[0]), str(subsets[1]), "--out", str(out), "--only", "14"]) == 0


# ----------------------------------------------------------------------------- review fixes


def _polygon_area(xy: np.ndarray) -> float:
    """Shoelace area of a closed polygon's vertices."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_overlap_roc_area_equals_auroc_with_tied_scores():
    """Tied overlaps (one correct and one incorrect answer with the same score) make a diagonal
    ROC segment; the curve and its shading must enclose the AUROC in the legend (sklearn's,
    which counts a tie as one half), not a staircase below it."""
    from matplotlib.cbook import STEP_LOOKUP_MAP
    from sklearn.metrics import roc_auc_score

    from vislens.analysis import LayerStats

    correct = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0], bool)
    n = correct.size
    ov = np.where(correct, 0.6, 0.4)
    ov[[0, 3, 6, 7]] = 0.5  # two correct and two incorrect answers tie
    ov = np.stack([ov, ov[::-1]], axis=1)
    z = np.zeros((n, 2))
    st = LayerStats("baseline", np.arange(n), correct, np.full(n, 0.5), np.array(["left"] * n),
                    z + 0.1, z + 0.9, z, z, z, z, overlap=ov)
    want = roc_auc_score(correct, ov[:, 0])
    ax = _axes(plots.overlap_roc(st, [0]))[0]
    (curve,) = [ln for ln in ax.lines if ln.get_label().startswith("AUROC")]
    x, y = STEP_LOOKUP_MAP[curve.get_drawstyle()](*curve.get_data())
    assert np.trapezoid(y, x) == pytest.approx(want, rel=1e-9)
    (shade,) = ax.collections
    assert _polygon_area(shade.get_paths()[0].vertices) == pytest.approx(want, rel=1e-9)


def test_figures_9_10_26_prefer_unrestricted_scaling(tmp_path):
    """A ScalingVis condition restricted to some heads is not the paper's smoothing/sharpening:
    with an unrestricted one present, Figures 9, 10 and 26 use the unrestricted one."""
    p = make_capture(tmp_path / "heads.h5", n=8,
                     conditions=("baseline", "scaling:0.5", "scaling:0.2,heads=0",
                                 "scaling:3,heads=1", "scaling:2"))
    with open_capture(p) as cap:
        assert plots.scaling_condition(cap, "smooth") == "scaling-0.5"
        assert plots.scaling_condition(cap, "sharpen") == "scaling-2"
    titles = [a.get_title() for a in _axes(plots.before_after(p, FOCUS_LAYER, kind="smooth",
                                                             n_examples=1))]
    assert "ScalingVis α=0.5" in titles[1]
    # only restricted ones: the most extreme of those (there is nothing else to show)
    q = make_capture(tmp_path / "only_heads.h5", n=8,
                     conditions=("baseline", "scaling:0.5,heads=0", "scaling:0.2,heads=1"))
    with open_capture(q) as cap:
        assert plots.scaling_condition(cap, "smooth") == "scaling-0.2"


def test_subsets_with_one_label_and_one_file_name_stay_apart(tmp_path):
    """Two captures of the same dataset named alike in different folders (x/run.h5, y/run.h5)
    are two subsets: each gets its own box, mean and accuracy in Figure 14, its own column in
    Figure 15, and `vislens figures` compares both (none merged into or dropped for another)."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    paths = [make_capture(tmp_path / "x" / "run.h5", n=8, conditions=("baseline",), seed=3),
             make_capture(tmp_path / "y" / "run.h5", n=12, conditions=("baseline",), seed=4)]
    labels = plots.subset_labels(paths)
    assert len(set(labels)) == 2
    fig = plots.subset_entropy_skewness(paths, FOCUS_LAYER)
    ax, bx = _axes(fig)
    ent_means = next(ln for ln in ax.lines if ln.get_label() == "mean").get_ydata()
    ticks = [t.get_text() for t in bx.get_xticklabels()]
    assert len(ticks) == 2
    fig15 = plots.relation_familiarity(paths)
    heat = np.ma.filled(_axes(fig15)[2].get_images()[0].get_array(), np.nan)
    assert heat.shape[1] == 2
    for i, path in enumerate(paths):
        with open_capture(path) as cap:
            attn = cap.attention("baseline", layers=[FOCUS_LAYER])[:, 0]
            t = cap.table(conditions=["baseline"])
        ent, _ = _eq4_eq5_by_hand(attn)
        assert ent_means[i] == pytest.approx(ent.mean(), rel=1e-4)
        assert ticks[i].startswith(labels[i]) and f"n={len(t)}," in ticks[i]
        want = 100 * t.loc[t["relation"] == "left", "confidence"].mean()
        assert heat[0, i] == pytest.approx(want, rel=1e-6)
    notes: list[str] = []
    figures.write_figures(paths, tmp_path / "f", only=[14], log=notes.append)
    assert notes[0].startswith("comparing 2 subsets") and all(lab in notes[0] for lab in labels)
    # the same file twice is still two columns, told apart
    assert len(set(plots.subset_labels([paths[0], paths[0]]))) == 2


def test_phrase_counts_of_one_group_are_summed(subsets, tmp_path):
    """Figure 15's middle panel draws one bar per relation group: a table that lists several
    relations of a group (on and above, under and below) shows their sum, not overlapping bars."""
    import json

    phr = tmp_path / "phrases.json"
    phr.write_text(json.dumps({"left": 50, "on": 30, "above": 20, "under": 10, "below": 5}))
    px = _axes(plots.relation_familiarity(subsets, phr))[1]
    names = [t.get_text() for t in px.get_xticklabels()]
    heights = [b.get_height() for b in px.patches]
    assert names == ["left", "On etc", "Under etc"]
    assert heights == [50, 50, 15]
    assert [t.get_text().split("\n")[1] for t in px.texts] == ["(43%)", "(43%)", "(13%)"]


def test_heatmap_rows_not_done_are_one_line(caps, tmp_path):
    """Figure 5 with explicit rows: a row not completed under the condition is refused in one
    line naming it (not a KeyError from the results table)."""
    import shutil

    import h5py

    p = tmp_path / "part.h5"
    shutil.copyfile(caps["full"], p)
    with h5py.File(p, "r+") as f:
        f["conditions/baseline/done"][3] = False
    with pytest.raises(VislensError, match="row 3 is not completed") as info:
        plots.attention_heatmaps(p, FOCUS_LAYER, rows={"correct": [0], "incorrect": [3]})
    assert "\n" not in str(info.value)


def test_scaling_sweep_draws_every_adaptvis_condition(tmp_path):
    """Figure 8's AdaptVis reference: one line per AdaptVis condition in the capture (a beta
    sweep has several), each at its own accuracy; none is left out."""
    betas = ("0.3", "0.5", "0.7")
    p = make_capture(tmp_path / "betas.h5", n=16, seed=6,
                     conditions=("baseline", "scaling:0.5", "scaling:2",
                                 *(f"adaptvis:alpha1=0.5,alpha2=2,beta={b},name=adaptvis-{b}"
                                   for b in betas)))
    ax = _axes(plots.scaling_sweep(p))[0]
    with open_capture(p) as cap:
        tab = cap.table()
        names = [c for c in cap.conditions if c.startswith("adaptvis")]
    assert len(names) == 3
    refs = [ln for ln in ax.lines if "AdaptVis" in str(ln.get_label())]
    assert len(refs) == 3
    for name, ln in zip(names, refs):
        acc = 100 * tab.loc[tab["condition"] == name, "correct"].mean()
        assert ln.get_ydata()[0] == pytest.approx(acc, rel=1e-9)
