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


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """Layer 1 attends to the objects exactly when the answer is right; layers 0, 2 are noise."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("rep") / "c.h5"
    samples, masks, boxes = [], np.zeros((N, G, G), np.float32), []
    for i in range(N):
        r, c = rng.integers(0, G - 2, size=2)
        masks[i, r:r + 2, c:c + 2] = 1
        boxes.append([Box("a", (c * 8.0, r * 8.0, c * 8.0 + 16, r * 8.0 + 16))])
        samples.append(Sample(id=f"s{i}", image_path="", question="Where is the a in relation to the b?",
                              options=["Left", "Right"], answer="Left", relation=["left", "right"][i % 2]))
    correct = rng.random(N) < 0.5
    correct[:2] = [True, False]
    conds = [parse_condition("baseline"), parse_condition("scaling:alpha=2")]
    w = CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L, num_heads=H,
                           num_options=2, attrs={"model": "synthetic"}, box_masks=masks, boxes=boxes,
                           sizes=[(48, 48)] * N)
    truth = {}
    for i in range(N):
        attn = rng.dirichlet(np.ones(G * G), size=(L, H)).reshape(L, H, G, G) * 0.4
        if correct[i]:
            attn[1] = 0.2 * attn[1] + 0.8 * 0.4 * masks[i] / masks[i].sum()
        res = {}
        for c in ("baseline", "scaling-2"):
            res[c] = ConditionResult(text="Left" if correct[i] else "Right", first_token=0,
                                     confidence=0.5 + 0.4 * correct[i],
                                     option_probs=np.array([0.5, 0.5]), alpha_used=1.0,
                                     image_attention=attn.astype(np.float16),
                                     image_mass=np.full((L, H), 0.4, np.float32),
                                     text_mass=np.full((L, H), 0.6, np.float32))
        truth[i] = attn.astype(np.float16).astype(np.float64)
        w.write_batch([i], [res], [{"baseline": bool(correct[i]), "scaling-2": bool(correct[i])}])
    w.finalize()
    w.close()
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
    assert list(df.columns) == ["condition", "layer", "auroc", "n_pos", "n_neg"]
    for layer in range(L):
        scores = [plain_overlap(truth[i], masks[i])[layer] for i in range(N)]
        row = df[(df.condition == "baseline") & (df.layer == layer)].iloc[0]
        assert row.auroc == pytest.approx(roc_auc_score(correct, scores))
        assert (row.n_pos, row.n_neg) == (correct.sum(), (~correct).sum())
    best = df[df.condition == "baseline"].sort_values("auroc").iloc[-1]
    assert best.layer == 1 and best.auroc > 0.95
    md = (out / "report.md").read_text()
    assert "layer 1" in md and "baseline" in md


def test_undefined_auroc_reported_as_nan(tmp_path):
    from vislens.analysis import per_layer_auroc_table, LayerStats

    st = LayerStats("c", np.arange(3), np.ones(3, bool), np.ones(3), np.array(["l"] * 3),
                    np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)),
                    np.ones((3, 2)), np.ones((3, 2)), overlap=np.random.rand(3, 2))
    t = per_layer_auroc_table([st])
    assert t["auroc"].isna().all() and (t["n_neg"] == 0).all()
