"""Streaming analysis and ``vislens report`` on a synthetic capture whose answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from vislens.analysis import all_stats
from vislens.data.base import Box, Sample
from vislens.conditions import ConditionResult, parse_condition
from vislens.store import CaptureWriter, open_capture

L, H, G, N = 3, 2, 6, 40


def _write_capture(path, *, n_done: int = N, seed: int = 0):
    """Layer 1 attends to the objects exactly when the answer is right, layer 2 exactly when it
    is wrong (an inverted layer); layer 0 is noise. Every third sample is a validation one.

    Only the first ``n_done`` samples are written; with fewer than ``N`` the working file is
    left unfinished (as a killed or still running capture leaves it).
    """
    rng = np.random.default_rng(seed)
    samples, masks, boxes = [], np.zeros((N, G, G), np.float32), []
    for i in range(N):
        r, c = rng.integers(0, G - 2, size=2)
        masks[i, r:r + 2, c:c + 2] = 1
        boxes.append([Box("a", (c * 8.0, r * 8.0, c * 8.0 + 16, r * 8.0 + 16))])
        samples.append(Sample(id=f"s{i}", image_path="", question="Where is the a in relation to the b?",
                              options=["Left", "Right"], answer="Left", relation=["left", "right"][i % 2],
                              split="val" if i % 3 == 0 else "test"))
    correct = rng.random(N) < 0.5
    correct[:2] = [True, False]
    conds = [parse_condition("baseline"), parse_condition("scaling:alpha=2")]
    w = CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L, num_heads=H,
                           num_options=2, attrs={"model": "synthetic"}, box_masks=masks, boxes=boxes,
                           sizes=[(48, 48)] * N)
    truth = {}
    for i in range(n_done):
        attn = rng.dirichlet(np.ones(G * G), size=(L, H)).reshape(L, H, G, G) * 0.4
        focus = 1 if correct[i] else 2
        attn[focus] = 0.2 * attn[focus] + 0.8 * 0.4 * masks[i] / masks[i].sum()
        res = {}
        for c in ("baseline", "scaling-2"):
            res[c] = ConditionResult(text="Left" if correct[i] else "Right", first_token=0,
                                     confidence=0.5 + 0.4 * correct[i],
                                     option_probs=np.array([0.5, 0.5]), alpha_used=1.0,
                                     image_attention=attn.astype(np.float16),
                                     image_mass=np.full((L, H), 0.4, np.float32),
                                     text_mass=np.full((L, H), 0.6, np.float32),
                                     image_logit_mean=np.full((L, H), -1.0, np.float32),
                                     image_logit_max=np.full((L, H), 2.0, np.float32))
        truth[i] = attn.astype(np.float16).astype(np.float64)
        w.write_batch([i], [res], [{"baseline": bool(correct[i]), "scaling-2": bool(correct[i])}])
    w.finalize()
    w.close()
    return truth, masks, correct


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "c.h5"
    truth, masks, correct = _write_capture(path)
    return path, truth, masks, correct


def plain_overlap(attn, mask):
    m = attn.mean(axis=1).reshape(L, -1)  # head-mean map per layer
    v = mask.ravel()
    return (m @ v) / (np.linalg.norm(m, axis=1) * np.linalg.norm(v))


def test_streamed_stats_equal_plain_numpy(capture):
    path, truth, masks, correct = capture
    for chunk in (1, 7, 64):
        st = all_stats(path, ["baseline"], chunk=chunk)[0]
        assert list(st.rows) == list(range(N))
        expect = np.stack([plain_overlap(truth[i], masks[i]) for i in range(N)])
        np.testing.assert_allclose(st.overlap, expect, rtol=1e-6)
        np.testing.assert_array_equal(st.correct, correct)


def test_report_files_and_auroc(capture, tmp_path):
    from vislens.cli import main

    path, truth, masks, correct = capture
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--chunk", "8"]) == 0
    out = tmp_path / "r"
    for f in ("per_layer_auroc.csv", "per_layer_auroc.png", "roc_best_layers.png", "summary.csv",
              "attention_by_layer.csv", "calibration.csv", "report.md"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    df = pd.read_csv(out / "per_layer_auroc.csv")
    assert list(df.columns) == ["condition", "layer", "auroc", "n_pos", "n_neg", "auroc_low",
                                "auroc_high"]
    assert (df["auroc_low"] <= df["auroc"]).all() and (df["auroc"] <= df["auroc_high"]).all()
    for layer in range(L):
        scores = [plain_overlap(truth[i], masks[i])[layer] for i in range(N)]
        row = df[(df.condition == "baseline") & (df.layer == layer)].iloc[0]
        assert row.auroc == pytest.approx(roc_auc_score(correct, scores))
        assert (row.n_pos, row.n_neg) == (correct.sum(), (~correct).sum())
    best = df[df.condition == "baseline"].sort_values("auroc").iloc[-1]
    assert best.layer == 1 and best.auroc > 0.95
    md = (out / "report.md").read_text()
    assert "layer 1" in md and "baseline" in md
    # the validation-chosen layer, scored on the test samples only, apart from the maximum
    val, test = np.arange(N) % 3 == 0, np.arange(N) % 3 != 0
    test_auroc = roc_auc_score(correct[test], [plain_overlap(truth[i], masks[i])[1]
                                               for i in np.flatnonzero(test)])
    assert f"validation split: **layer 1**" in md
    assert f"test AUROC **{test_auroc:.3f}**" in md and f"({test.sum()} test samples)" in md
    assert "maximum over layers (layer chosen and scored on the same samples" in md
    inv = df[(df.condition == "baseline") & (df.layer == 2)].iloc[0]
    assert inv.auroc < 0.05
    assert inv.auroc_high < 0.5
    assert f"inverted layers (AUROC < 0.5" in md and f"**layer 2: {inv.auroc:.3f}**" in md


def _eq4_eq5(cells):
    p = cells.ravel() / cells.sum()
    j = np.arange(p.size)
    mu = (j * p).sum()
    sd = np.sqrt(((j - mu) ** 2 * p).sum())
    nz = p[p > 0]
    return -(nz * np.log(nz)).sum(), ((j - mu) ** 3 * p).sum() / sd ** 3


def test_attention_stats_csv_is_per_head_eq4_eq5_averaged(capture, tmp_path):
    from vislens.report import write_report

    path, truth, masks, correct = capture
    write_report(path, tmp_path / "r", conditions=["baseline"], chunk=16)
    df = pd.read_csv(tmp_path / "r" / "attention_stats.csv")
    assert list(df.columns) == ["condition", "sample_id", "layer", "entropy", "skewness"]
    assert len(df) == N * L and set(df["condition"]) == {"baseline"}
    for i, layer in [(0, 0), (7, 1), (31, 2)]:
        row = df[(df.sample_id == f"s{i}") & (df.layer == layer)].iloc[0]
        per_head = np.array([_eq4_eq5(truth[i][layer, h]) for h in range(H)])
        assert row.entropy == pytest.approx(per_head[:, 0].mean(), rel=1e-5)
        assert row.skewness == pytest.approx(per_head[:, 1].mean(), rel=1e-5)


def test_undefined_auroc_reported_as_nan(tmp_path):
    from vislens.analysis import per_layer_auroc_table, LayerStats

    st = LayerStats("c", np.arange(3), np.ones(3, bool), np.ones(3), np.array(["l"] * 3),
                    np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)),
                    np.ones((3, 2)), np.ones((3, 2)), overlap=np.random.rand(3, 2))
    t = per_layer_auroc_table([st])
    assert t["auroc"].isna().all() and (t["n_neg"] == 0).all()


def test_unfinished_capture_is_said_everywhere(tmp_path, capsys):
    """evaluate / report / figures on a working file: one line and the report header say
    how many samples the numbers rest on (they used to say "40 samples" and use 12)."""
    from vislens.cli import main

    path = tmp_path / "work.h5"
    _, _, correct = _write_capture(path, n_done=12)
    with open_capture(path) as cap:
        assert not cap.complete and int(cap.done("baseline").sum()) == 12
    note = f"{path}: 12 of {N} samples done (unfinished capture)"

    assert main(["evaluate", str(path), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == note
    acc = pd.read_csv(tmp_path / "e" / "accuracy.csv")
    base = acc[(acc.matcher == "paper") & (acc.condition == "baseline")].iloc[0]
    assert base.n == 12

    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    assert note in capsys.readouterr().out.splitlines()
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"12 of {N} samples done (unfinished capture)" in md.splitlines()[2]
    assert f"{N} samples;" not in md
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert (summary["n"] == 12).all()
    assert summary.loc[summary.condition == "baseline", "accuracy"].item() == pytest.approx(correct[:12].mean())

    assert main(["figures", str(path), "--out", str(tmp_path / "f"), "--only", "7"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(note)


def test_complete_capture_header_and_no_note(capture, tmp_path, capsys):
    from vislens.evaluate import evaluate_capture
    from vislens.report import write_report

    path = capture[0]
    evaluate_capture(path)
    report = write_report(path, tmp_path / "r")
    assert "unfinished" not in capsys.readouterr().out
    assert f"; {N} samples; {L} layers" in report.read_text()


def test_boxes_without_any_match_explain_themselves(tmp_path, recwarn):
    """Boxes attached, but no question object matched: the report says why and how to fix
    it, with no "Mean of empty slice" warning and no "best undefined (0 correct / 0 wrong)"."""
    from vislens.boxes import Unmatched
    from vislens.report import write_report
    from vislens.store import replace_boxes

    path = tmp_path / "c.h5"
    _, _, correct = _write_capture(path)
    reason = "no detection of class 'cat' above conf 0.25"
    replace_boxes(path, np.zeros((N, G, G), np.float32), [[] for _ in range(N)], "yolo",
                  unmatched=[[Unmatched("cat", reason)] for _ in range(N)])
    md = write_report(path, tmp_path / "r").read_text()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
    assert "0 correct / 0 wrong" not in md and "best undefined" not in md
    assert (f"The capture has boxes, but none of the {N} analysed samples has a box for its "
            f"question objects, so overlap and AUROC are undefined: 'cat' (s0): {reason}.") in md
    assert "rerun `vislens boxes FILE`" in md and "--detector annotations" in md
    assert not (tmp_path / "r" / "per_layer_auroc.png").exists()
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert summary["overlap"].isna().all()
    assert summary["accuracy"].tolist() == pytest.approx([correct.mean()] * 2)


def test_partly_matched_boxes_say_how_many_samples_count(tmp_path):
    from vislens.boxes import Unmatched
    from vislens.report import write_report
    from vislens.store import replace_boxes

    path = tmp_path / "c.h5"
    truth, masks, correct = _write_capture(path)
    keep = np.arange(N) % 4 != 3  # every 4th sample lost its box
    with open_capture(path) as cap:
        boxes = cap.boxes()
    box_lists = [[Box(r.label, (r.x0, r.y0, r.x1, r.y1))] if keep[r.row] else []
                 for r in boxes.itertuples()]
    replace_boxes(path, masks * keep[:, None, None], box_lists, "yolo",
                  unmatched=[[] if k else [Unmatched("a", "no COCO class for 'a'")] for k in keep])
    rep = tmp_path / "r"
    md = write_report(path, rep).read_text()
    assert (f"Overlap and AUROC use the {keep.sum()} of {N} samples with a box for their "
            f"question objects (without: 'a' (s3): no COCO class for 'a').") in md
    df = pd.read_csv(rep / "per_layer_auroc.csv")
    row = df[(df.condition == "baseline") & (df.layer == 1)].iloc[0]
    scores = [plain_overlap(truth[i], masks[i])[1] for i in np.flatnonzero(keep)]
    assert row.auroc == pytest.approx(roc_auc_score(correct[keep], scores), rel=1e-9)
    assert (row.n_pos, row.n_neg) == (correct[keep].sum(), (~correct[keep]).sum())
def test_evaluate_capture_table7_and_intervals(capture, tmp_path):
    from vislens.evaluate import evaluate_capture

    path, truth, masks, correct = capture
    tables = evaluate_capture(path, tmp_path / "e")
    gold = tables["gold_frequency"]
    assert gold.loc[("left", "Left"), "n"] == N // 2 and gold.loc[("right", "Left"), "n"] == N // 2
    assert gold.loc[("right", "Left"), "percent_of_relation"] == pytest.approx(100.0)
    assert (tmp_path / "e" / "gold_frequency.csv").exists()
    acc = tables["accuracy"]
    row = acc[acc["matcher"] == "first-word"].loc["baseline"]
    assert row["acc_low"] < row["acc"] < row["acc_high"]


def test_figures_layer_defaults_and_validation_choice(capture, tmp_path):
    """Per-layer figures default to the paper's layers at this depth; --layer best is chosen
    on the validation samples and Figure 6 is then drawn on the test samples."""
    from vislens import figures

    path, truth, masks, correct = capture
    notes: list[str] = []
    paths = figures.write_figures(path, tmp_path / "a", only=[5, 26], log=notes.append)
    # 3 layers: paper layer 17 of 32 -> round(17 * 3 / 32) = 2; 14 of 32 -> 1
    assert sorted(p.name for p in paths) == ["fig05_heatmaps_layer2.png", "fig26_attention_logits_layer1.png"]
    assert "the paper's layers" in notes[-1]
    notes.clear()
    paths = figures.write_figures(path, tmp_path / "b", layer="best", only=[5, 6], log=notes.append)
    assert sorted(p.name for p in paths) == ["fig05_heatmaps_layer1.png", "fig06_overlap_roc.png"]
    test = np.arange(N) % 3 != 0
    want = roc_auc_score(correct[test], [plain_overlap(truth[i], masks[i])[1] for i in np.flatnonzero(test)])
    assert f"{test.sum()} test samples, AUROC {want:.3f}" in notes[-1]
    assert figures.main([str(path), "--out", str(tmp_path / "c"), "--layer", "best", "--only", "6"]) == 0
    with pytest.raises(SystemExit):  # argparse: usage and exit status 2
        figures.main([str(path), "--out", str(tmp_path / "c"), "--layer", "top"])


def test_report_names_the_dataset_readably(capture, tmp_path):
    import shutil

    import h5py

    from vislens.report import write_report

    path = tmp_path / "c.h5"
    shutil.copy(capture[0], path)
    spec = "jsonl:/tmp/xyz/controlled_a.jsonl"
    with h5py.File(path, "r+") as f:
        f.attrs["dataset"] = spec
    md = write_report(path, tmp_path / "r").read_text()
    assert f"dataset: Controlled_A (`{spec}`)" in md  # readable name, raw spec kept beside it
    assert md.count(spec) == 1


def test_report_conditions_restrict_every_section(capture, tmp_path):
    """``--conditions`` is honoured by the accuracy table too (it listed every condition)."""
    from vislens.report import write_report

    path, truth, masks, correct = capture
    md = write_report(path, tmp_path / "r", conditions=["scaling-2"], log=None).read_text()
    accuracy = md.split("## Accuracy", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in accuracy.splitlines() if line.startswith("| ")]
    assert rows == ["condition", "scaling-2"]
    assert f"| scaling-2 | {N} |" in accuracy
