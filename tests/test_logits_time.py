"""Capture format 2: the answer row's image-key logits (Fig. 26) and per-condition compute
time (Table 9), and how version-1 files keep working.

The logits are checked against the eager full-matrix reference (tests/eager_reference.py);
the compute-time attribution against forward counts (a fake clock), never wall time.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import random_image
from eager_reference import assert_close, knockout_edit, reference_forward
from vislens.conditions import parse_condition
from vislens.data.base import Sample
from vislens.decoding import DecodingEngine
from vislens.errors import VislensError
from vislens.store import CaptureWriter, merge, open_capture

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
SHORT = "Where is the box?"
OPTIONS = ["Left", "Right", "On", "Under"]
ALPHAS = {"baseline": 1.0, "scaling-0.5": 0.5, "scaling-2": 2.0}


def _expected_stats(logits: dict[int, torch.Tensor], keys: torch.Tensor):
    """Mean and max over each row's image keys, [B, L, H], from full-matrix logits."""
    layers = sorted(logits)
    full = np.stack([logits[l].double().numpy() for l in layers], axis=1)  # [B, L, H, K]
    keys = keys.numpy()
    mean = np.stack([full[i][..., keys[i]].mean(-1) for i in range(full.shape[0])])
    top = np.stack([full[i][..., keys[i]].max(-1) for i in range(full.shape[0])])
    return mean, top


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_image_logits_match_eager_reference(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    images = [random_image(1, (60, 40)), random_image(2, (44, 52))]
    questions = [QUESTION, SHORT]
    batch = adapter.prepare(images, questions)
    assert bool((batch.attention_mask[1] == 0).any()), "second prompt must be left-padded"
    conds = [parse_condition(s) for s in ("baseline", "scaling:alpha=0.5", "scaling:alpha=2",
                                          "add:delta=1", "knockout")]
    res = DecodingEngine(adapter, max_new_tokens=1).run(images, questions, [OPTIONS] * 2, conds)
    L, H = adapter.num_layers, adapter.num_heads
    for name, alpha in ALPHAS.items():
        ref: dict = {}
        reference_forward(adapter, batch, [alpha] * 2, logits=ref)
        mean, top = _expected_stats(ref, batch.image_keys)
        for i in range(2):
            got = res[i][name]
            assert got.image_logit_mean.shape == got.image_logit_max.shape == (L, H)
            assert_close(got.image_logit_mean, mean[i])
            assert_close(got.image_logit_max, top[i])
    for i in range(2):
        base = res[i]["baseline"]
        # the first layer sees the baseline's query and keys: its logits are alpha times
        for name in ("scaling-0.5", "scaling-2"):
            a = ALPHAS[name]
            assert_close(res[i][name].image_logit_mean[0], a * base.image_logit_mean[0], rel=1e-5)
            assert_close(res[i][name].image_logit_max[0], a * base.image_logit_max[0], rel=1e-5)
        assert_close(res[i]["add+1"].image_logit_mean[0], base.image_logit_mean[0] + 1, rel=1e-5)
        # later layers read the steered output of the layers before: no longer just alpha times
        later = res[i]["scaling-2"].image_logit_mean[1:] - 2 * base.image_logit_mean[1:]
        assert np.abs(later).max() > 1e-3 * np.abs(base.image_logit_mean).max()
        # knocked-out image keys have -inf logits, every layer and head
        assert np.isneginf(res[i]["knockout"].image_logit_max).all()
    ref = {}
    reference_forward(adapter, batch, knockout_edit(), logits=ref)
    assert np.isneginf(_expected_stats(ref, batch.image_keys)[1]).all()


def _counting_engine(adapter, **kw) -> DecodingEngine:
    """An engine whose clock is its forward count: each forward takes one 'second'."""
    engine = DecodingEngine(adapter, max_new_tokens=1, clock=lambda: float(engine.forward_calls), **kw)
    return engine


@pytest.mark.parametrize("fused_rows", [32, 2])
def test_compute_seconds_attribute_forwards_to_conditions(tiny_adapter, fused_rows):
    adapter = tiny_adapter("llava")
    images = [random_image(3), random_image(4, (50, 50))]
    specs = ["baseline", "scaling:alpha=0.5", "scaling:alpha=1", "vcd",
             "adaptvis:alpha1=0.5,alpha2=2,beta=0.5"]
    engine = _counting_engine(adapter, max_fused_rows=fused_rows)
    res = engine.run(images, [QUESTION, SHORT], [OPTIONS] * 2, [parse_condition(s) for s in specs])
    sec = {name: r.compute_seconds for name, r in res[0].items()}
    assert all(res[1][n].compute_seconds == sec[n] for n in sec)  # per sample: the batch's / 2
    # by hand, in forwards per batch of 2: the prefix prefill (1) is everyone's; greedy
    # settings baseline and scale 0.5 (scaling-1 is the baseline's setting, adaptvis's alpha1
    # too or its own per-row setting) take 1 forward each, or share one (1/2 each) when fused
    share = 1 / 2 if fused_rows == 32 else 1.0
    assert sec["baseline"] == sec["scaling-1"] == sec["scaling-0.5"] == pytest.approx((1 + share) / 2)
    # VCD: its own prefill of the noised image, the real and the noised forward
    assert sec["vcd"] == pytest.approx((1 + 3) / 2)
    if fused_rows == 2:  # AdaptVis: the unsteered confidence probe (1) + its one setting (1)
        assert sec["adaptvis"] == pytest.approx((1 + 1 + 1) / 2)
    assert sec["adaptvis"] > sec["baseline"]


def _samples(n: int) -> list[Sample]:
    return [Sample(id=f"s{i}", image_path="", question=QUESTION, options=list(OPTIONS),
                   answer="Left", relation="left") for i in range(n)]


def test_stored_logits_and_table9(tiny_adapter, tmp_path):
    from vislens.evaluate import evaluate_capture

    adapter = tiny_adapter("llava")
    images = [random_image(5), random_image(6)]
    conds = [parse_condition(s) for s in ("baseline", "scaling:alpha=2", "vcd")]
    res = _counting_engine(adapter, grid=4).run(images, [QUESTION] * 2, [OPTIONS] * 2, conds)
    path = tmp_path / "c.h5"
    with CaptureWriter.open(path, samples=_samples(2), conditions=conds, grid=4,
                            num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                            num_options=4, attrs={"model": "tiny"}) as w:
        w.write_batch([0, 1], res, [{c.name: True for c in conds}] * 2)
        w.finalize()
    with open_capture(path) as cap:
        assert cap.format_version == 2
        for c in conds:
            mean, top = cap.image_logits(c.name)
            np.testing.assert_array_equal(mean[1], res[1][c.name].image_logit_mean)
            np.testing.assert_array_equal(top[0], res[0][c.name].image_logit_max)
            np.testing.assert_allclose(cap.compute_seconds(c.name),
                                       [res[0][c.name].compute_seconds] * 2, rtol=1e-6)
    notes: list[str] = []
    t9 = evaluate_capture(path, log=notes.append)["inference_time"]
    assert list(t9.index) == ["baseline", "scaling-2", "vcd"] and not notes
    # greedy: prefill + a fused share (1/2); vcd: prefill + 3 forwards
    assert t9.loc["baseline", "ratio"] == pytest.approx(1.0)
    assert t9.loc["scaling-2", "ratio"] == pytest.approx(1.0)
    assert t9.loc["vcd", "ratio"] == pytest.approx(4 / 1.5)
    assert t9.loc["vcd", "method"] == "vcd" and t9.loc["vcd", "n"] == 2


def _as_version_1(path) -> None:
    """Turn a final version-2 capture into what vislens before 0.2 wrote."""
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        for c in f["conditions"]:
            for name in ("image_logit_mean", "image_logit_max", "compute_seconds"):
                del f[f"conditions/{c}/{name}"]


def test_version_1_files_stay_readable(tmp_path):
    from test_plots import make_capture
    from vislens import figures
    from vislens.evaluate import evaluate_capture

    conds = ("baseline", "scaling:0.5", "scaling:2")
    paths = []
    for k in range(2):
        p = make_capture(tmp_path / f"s{k}.h5", n=8, conditions=conds, attrs={"shard": f"{k}/2"},
                         seed=k)
        with h5py.File(p, "r+") as f:  # the second shard holds the next 8 dataset positions
            f["samples/index"][...] = np.arange(8) + 8 * k
        paths.append(p)
    v2 = make_capture(tmp_path / "v2.h5", n=8, conditions=conds, attrs={"shard": "1/2"}, seed=1)
    with h5py.File(v2, "r+") as f:
        f["samples/index"][...] = np.arange(8, 16)
    for p in paths:
        _as_version_1(p)

    with open_capture(paths[0]) as cap:
        assert cap.format_version == 1 and len(cap.table()) == 24
        with pytest.raises(VislensError, match=r"needs a capture made by vislens >= 0\.2 "
                                               r"\(image logits\).*format version 1") as exc:
            cap.image_logits("baseline")
        assert "\n" not in str(exc.value)
        with pytest.raises(VislensError, match=r"\(compute time\)"):
            cap.compute_seconds("baseline")
    notes: list[str] = []
    assert figures.write_figures(paths[0], tmp_path / "figs", only=[26], log=notes.append) == []
    skipped = [n for n in notes if n.startswith("skipped fig26_attention_logits")]
    assert len(skipped) == 1 and "needs a capture made by vislens >= 0.2 (image logits)" in skipped[0]
    notes.clear()
    tables = evaluate_capture(paths[0], log=notes.append)
    assert "inference_time" not in tables and "accuracy" in tables
    assert notes == [f"Table 9 (inference time) skipped: {paths[0]}: needs a capture made by "
                     "vislens >= 0.2 (compute time); this file has capture format version 1"]

    # merge: two version-1 shards give a version-1 file; mixing versions is refused
    out = merge(tmp_path / "m1.h5", paths)
    with open_capture(out) as cap:
        assert cap.format_version == 1 and len(cap) == 16 and cap.complete
        np.testing.assert_array_equal(cap.masses("scaling-2")[0][8:],
                                      open_capture(paths[1]).masses("scaling-2")[0])
    with pytest.raises(VislensError, match=r"v2\.h5: merge: capture format version 2 but 1 in "
                                           r".*s0\.h5") as exc:
        merge(tmp_path / "m2.h5", [paths[0], v2])
    assert "\n" not in str(exc.value) and not (tmp_path / "m2.h5").exists()
    # a version-2 shard pair merges with its logits and times
    v2a = make_capture(tmp_path / "v2a.h5", n=8, conditions=conds, attrs={"shard": "0/2"}, seed=0)
    out = merge(tmp_path / "m3.h5", [v2a, v2])
    with open_capture(out) as cap, open_capture(v2) as b:
        assert cap.format_version == 2
        np.testing.assert_array_equal(cap.image_logits("scaling-2")[1][8:], b.image_logits("scaling-2")[1])


def test_resuming_a_version_1_working_file_is_refused(tmp_path):
    conds = [parse_condition("baseline")]
    kw = dict(samples=_samples(2), conditions=conds, grid=2, num_layers=1, num_heads=1,
              num_options=4, attrs={"model": "tiny"})
    path = tmp_path / "w.h5"
    CaptureWriter.open(path, **kw).close()
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(VislensError, match=r"cannot resume: the working file has capture format "
                                           r"version 1, this vislens writes version 2"):
        CaptureWriter.open(path, **kw)


def test_evaluate_command_prints_table9(tmp_path, capsys):
    from test_plots import make_capture
    from vislens.cli import main

    path = make_capture(tmp_path / "c.h5", n=8, conditions=("baseline", "scaling:2"))
    with h5py.File(path, "r+") as f:  # baseline 0.5 s per sample, scaling 0.75 s
        f["conditions/baseline/compute_seconds"][...] = 0.5
        f["conditions/scaling-2/compute_seconds"][...] = 0.75
    assert main(["evaluate", str(path), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    table = out.split("## inference_time")[1].split("##")[0]
    row = next(line for line in table.splitlines() if line.startswith("| scaling-2"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["scaling-2", "scaling", "8", "0.75", "1.5"]
    assert (tmp_path / "ev" / "inference_time.csv").exists()
