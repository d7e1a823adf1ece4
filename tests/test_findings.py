"""``vislens findings``: every finding on synthetic captures built so that it holds and so
that it fails; the verdict flips. Captures are written with the public CaptureWriter."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from vislens.data.base import Box, Sample
from vislens.decoding import ConditionResult, parse_condition
from vislens.errors import VislensError
from vislens.findings import FINDINGS, load_evidence, run_findings
from vislens.store import CaptureWriter

L, H, G = 6, 2, 4  # thirds of the layers: early 0-1, middle 2-3
RELATIONS = ("left", "right", "on", "under")
OPTIONS = ["Left", "Right", "On", "Under"]
CONDITIONS = ("baseline", "add:delta=1", "scaling:alpha=0.5", "scaling:alpha=2",
              "adaptvis:alpha1=0.5,alpha2=2,beta=0.5", "vcd", "dola")
N_BOOT = 300


@dataclass(frozen=True)
class World:
    """Knobs: True = the paper's claim holds in the data, False = it fails."""

    share_low: bool = True  # F1
    add_hurts: bool = True  # F2
    overlap: str = "signal"  # F3/F4: "signal", "none", or "confound" (relation difficulty only)
    entropy_early_high: bool = True  # F5
    familiar_confident: bool = True  # F6
    confidence_predicts: bool = True  # F7
    scaling_halves: bool = True  # F8
    adapt_best: bool = True  # F9
    beats_contrastive: bool = True  # F10
    conditions: tuple = CONDITIONS
    splits: bool = True
    boxes: bool = True
    tokens: bool = True
    n: int = 200
    seed: int = 0


def _flip(rng, ok: np.ndarray, where: np.ndarray, to: bool, frac: float) -> np.ndarray:
    """Set a fraction ``frac`` of the samples in ``where`` that are not ``to`` to ``to``."""
    out = ok.copy()
    cand = np.flatnonzero(where & (ok != to))
    pick = rng.choice(cand, size=int(round(frac * cand.size)), replace=False) if cand.size else cand
    out[pick] = to
    return out


def build(path: Path, w: World) -> Path:
    rng = np.random.default_rng(w.seed)
    n = w.n
    rel = np.array([RELATIONS[i % 4] for i in range(n)])
    familiar = np.isin(rel, ("left", "right"))
    if w.overlap == "confound":  # familiar relations are easy, rare ones hard
        correct = np.where(familiar, rng.random(n) < 0.85, rng.random(n) < 0.15)
    else:
        correct = rng.random(n) < 0.5
    conf = np.where(correct, 0.55, 0.35) if w.confidence_predicts else np.full(n, 0.45)
    conf = conf + 0.3 * rng.random(n)
    conf = conf + (0.1 if w.familiar_confident else -0.1) * familiar
    low = conf < np.median(conf)

    # baseline attention: focus on the object mask (or a distractor cell) in the middle layers
    masks = np.zeros((n, G, G), np.float32)
    distract = np.zeros((n, G, G))
    boxes = []
    for i in range(n):
        r, c = rng.integers(0, G - 1, size=2)
        masks[i, r:r + 2, c:c + 2] = 1
        boxes.append([Box("cube", (c * 8.0, r * 8.0, c * 8.0 + 16, r * 8.0 + 16))])
        free = np.argwhere(masks[i] == 0)
        rr, cc = free[rng.integers(len(free))]
        distract[i, rr, cc] = 1
    if w.overlap == "signal":
        on_objects = correct
    elif w.overlap == "confound":
        on_objects = familiar
    else:
        on_objects = rng.random(n) < 0.5
    target = np.where(on_objects[:, None, None], masks / 4, distract)
    z = rng.normal(0, 0.6, (n, L, H, G, G))
    focused_layers = [2, 3] if w.entropy_early_high else [0, 1]
    for layer in focused_layers:
        z[:, layer] += 6.0 * target[:, None]
    spread_layers = [0, 1] if w.entropy_early_high else [2, 3]
    z[:, spread_layers] *= 0.05  # near-uniform
    attn = np.exp(z)
    attn /= attn.sum(axis=(-2, -1), keepdims=True)
    img_mass = np.full((n, L, H), 0.1 if w.share_low else 0.9) + 0.02 * rng.random((n, L, H))
    txt_mass = np.full((n, L, H), 0.5 if w.share_low else 0.04)
    attn = attn * img_mass[..., None, None]

    # other conditions' correctness, relative to the baseline
    outcome = {"baseline": correct}
    everywhere = np.ones(n, bool)
    outcome["add+1"] = (_flip(rng, correct, everywhere, False, 0.3) if w.add_hurts
                        else _flip(rng, correct, everywhere, True, 0.4))
    if w.scaling_halves:
        outcome["scaling-0.5"] = _flip(rng, correct, low, True, 0.5)
        outcome["scaling-2"] = _flip(rng, correct, ~low, True, 0.5)
    else:
        outcome["scaling-0.5"] = _flip(rng, correct, low, False, 0.5)
        outcome["scaling-2"] = _flip(rng, correct, ~low, False, 0.5)
    outcome["adaptvis"] = (_flip(rng, correct, everywhere, True, 0.7) if w.adapt_best
                           else _flip(rng, correct, everywhere, False, 0.3))
    best_ours = np.maximum(outcome["adaptvis"], outcome["scaling-2"])
    for name in ("vcd", "dola"):
        outcome[name] = (_flip(rng, correct, everywhere, False, 0.3) if w.beats_contrastive
                         else _flip(rng, best_ours, everywhere, True, 0.8))

    conds = [parse_condition(c) for c in w.conditions]
    samples = [Sample(id=f"s{i}", image_path="", question="Where is the cube?", options=OPTIONS,
                      answer=rel[i].capitalize(), relation=rel[i],
                      split=("val" if i % 5 == 0 else "test") if w.splits else "")
               for i in range(n)]
    path.unlink(missing_ok=True)
    writer = CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L,
                                num_heads=H, num_options=4, attrs={"model": "synthetic"},
                                box_masks=masks if w.boxes else None,
                                boxes=boxes if w.boxes else None, sizes=[(32, 32)] * n)
    for start in range(0, n, 50):
        rows = list(range(start, min(n, start + 50)))
        res, cor = [], []
        for i in rows:
            gold = OPTIONS.index(samples[i].answer)
            d = {}
            for c in conds:
                ok = bool(outcome[c.name][i])
                pred = gold if ok else (gold + 1) % 4
                d[c.name] = ConditionResult(
                    OPTIONS[pred], pred, float(conf[i]), np.full(4, 0.25, np.float32), 1.0,
                    attn[i].astype(np.float32), img_mass[i].astype(np.float32),
                    txt_mass[i].astype(np.float32), n_image_tokens=576 if w.tokens else 0,
                    n_text_tokens=50 if w.tokens else 0)
            res.append(d)
            cor.append({c.name: bool(outcome[c.name][i]) for c in conds})
        writer.write_batch(rows, res, cor)
    writer.finalize()
    writer.close()
    return path


@pytest.fixture(scope="module")
def scorecards(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    worlds = {
        "holds": World(),
        "fails": World(share_low=False, add_hurts=False, overlap="none", entropy_early_high=False,
                       familiar_confident=False, confidence_predicts=False, scaling_halves=False,
                       adapt_best=False, beats_contrastive=False, seed=1),
        "confound": World(overlap="confound", seed=2),
    }
    out = {}
    for name, w in worlds.items():
        ev = load_evidence(build(root / f"{name}.h5", w), chunk=64)
        out[name] = ({f.id: f for f in run_findings([ev], n_boot=N_BOOT)}, ev)
    return out


@pytest.mark.parametrize("fid", list(FINDINGS))
def test_verdict_flips_between_worlds(scorecards, fid):
    holds, fails = scorecards["holds"][0][fid], scorecards["fails"][0][fid]
    assert holds.verdict == "reproduced", holds
    assert fails.verdict == "not reproduced", fails
    for f in (holds, fails):
        assert f.ci_low <= f.value <= f.ci_high and f.n >= 10 and f.why


def test_f4_catches_relation_difficulty(scorecards):
    found, ev = scorecards["confound"]
    assert found["F3"].verdict == "reproduced"  # pooled over relations the overlap "works"
    assert found["F4"].verdict == "not reproduced"  # ... but not within any relation
    assert abs(found["F4"].value - 0.5) < 0.15


def test_values_against_plain_computations(scorecards):
    found, ev = scorecards["holds"]
    tab = ev.table
    base = tab[tab.condition == "baseline"].set_index("row")
    # F7: sklearn AUROC of confidence
    assert found["F7"].value == pytest.approx(roc_auc_score(base.correct, base.confidence))
    # F6: confidence difference in percentage points
    fam = base.relation.isin(["left", "right"])
    assert found["F6"].value == pytest.approx(100 * (base.confidence[fam].mean()
                                                     - base.confidence[~fam].mean()), rel=1e-6)
    # F2: the only add condition's paired accuracy change
    add = tab[tab.condition == "add+1"].set_index("row")
    assert found["F2"].value == pytest.approx(100 * (add.correct.mean() - base.correct.mean()))
    # F9: test-split difference of the only adaptvis and the validation-best scaling condition
    val = base.split == "val"
    sc = {c: tab[tab.condition == c].set_index("row").correct for c in ("scaling-0.5", "scaling-2")}
    best = max(sc, key=lambda c: (sc[c][val].mean(), c == "scaling-0.5"))
    ad = tab[tab.condition == "adaptvis"].set_index("row").correct
    test = ~val
    assert found["F9"].value == pytest.approx(100 * (ad[test].mean() - sc[best][test].mean()))
    assert best in found["F9"].why
    # F1: share ratio by hand
    img, txt = ev.masses
    ratio = (img[:, 2:4] / (img[:, 2:4] + txt[:, 2:4])).mean(axis=(1, 2)) / (576 / 626)
    assert found["F1"].value == pytest.approx(ratio.mean(), rel=1e-5)
    # F3: the layer named in "why" is chosen on validation, the value is its test AUROC
    st = ev.stats
    layer = int(found["F3"].why.split("layer ")[1].split()[0])
    v = st.split == "val"
    val_auroc = [roc_auc_score(st.correct[v], st.overlap[v, k]) for k in range(L)]
    assert layer == int(np.argmax(val_auroc))
    t = st.split == "test"
    assert found["F3"].value == pytest.approx(roc_auc_score(st.correct[t], st.overlap[t, layer]))


def test_not_testable_names_what_is_missing(tmp_path):
    w = World(conditions=("baseline", "scaling:alpha=2"), splits=False, boxes=False, tokens=False)
    ev = load_evidence(build(tmp_path / "bare.h5", w))
    found = {f.id: f for f in run_findings([ev], n_boot=50)}
    expect = {"F1": "token counts", "F2": "add", "F3": "box mask", "F4": "box mask",
              "F8": "alpha < 1", "F9": "adaptvis", "F10": "vcd or dola"}
    for fid, words in expect.items():
        assert found[fid].verdict == "not testable" and words in found[fid].why, found[fid]
        assert np.isnan(found[fid].value) and found[fid].n == 0
    assert found["F7"].verdict != "not testable"  # what it has is still tested
    w2 = World(splits=False)
    found = {f.id: f for f in run_findings([load_evidence(build(tmp_path / "nosplit.h5", w2))],
                                           n_boot=50)}
    for fid in ("F3", "F9", "F10"):
        assert found[fid].verdict == "not testable" and "validation" in found[fid].why, found[fid]


def test_several_captures_are_pooled(scorecards, tmp_path):
    one = scorecards["holds"][1]
    two = load_evidence(build(tmp_path / "two.h5", World(seed=5)))
    found = {f.id: f for f in run_findings([one, two], n_boot=N_BOOT)}
    single = scorecards["holds"][0]
    assert found["F7"].n == single["F7"].n + len(two.table[two.table.condition == "baseline"])
    assert found["F9"].n > single["F9"].n
    assert all(found[k].verdict == "reproduced" for k in FINDINGS)


def test_f3_interval_resamples_within_each_file(tmp_path):
    from vislens.metrics import bootstrap_indices, percentile_interval

    evs = [load_evidence(build(tmp_path / f"c{k}.h5", World(overlap="confound", seed=10 + k)))
           for k in range(2)]
    found = {f.id: f for f in run_findings(evs, n_boot=N_BOOT)}
    sts = [ev.stats for ev in evs]
    t = np.concatenate([st.split for st in sts]) == "test"
    layer = int(found["F3"].why.split("layer ")[1].split()[0])
    s = np.concatenate([st.overlap[:, layer] for st in sts])[t]
    y = np.concatenate([np.asarray(st.correct, bool) for st in sts])[t]
    files = np.concatenate([np.full(len(st.split), k) for k, st in enumerate(sts)])[t]
    assert found["F3"].value == pytest.approx(roc_auc_score(y, s))
    assert 0.55 < found["F3"].value < 0.99  # an interval with width, so resampling matters
    reps = np.array([roc_auc_score(y[i], s[i]) if 0 < y[i].sum() < i.size else np.nan
                     for i in bootstrap_indices(int(t.sum()), N_BOOT, 0, files)])
    assert (found["F3"].ci_low, found["F3"].ci_high) == pytest.approx(percentile_interval(reps), rel=1e-9)


def test_cli_writes_md_csv_json(scorecards, tmp_path, capsys):
    from vislens.cli import main

    path = scorecards["holds"][1].path
    assert main(["findings", str(path), "--out", str(tmp_path / "f"), "--n-boot", "200"]) == 0
    out = tmp_path / "f"
    data = json.loads((out / "findings.json").read_text())
    assert [d["id"] for d in data] == list(FINDINGS)
    assert set(data[0]) == {"id", "claim", "statistic", "value", "ci_low", "ci_high", "n",
                            "verdict", "why"}
    assert all(d["verdict"] in ("reproduced", "not reproduced", "not testable") for d in data)
    csv = pd.read_csv(out / "findings.csv")
    assert list(csv["id"]) == list(FINDINGS)
    md = (out / "findings.md").read_text()
    assert "| F3 | reproduced |" in md
    assert "F10" in capsys.readouterr().out
    assert main(["findings", str(tmp_path / "missing.h5"), "--out", str(out)]) == 2
    assert "missing.h5" in capsys.readouterr().err


def test_confidence_half_gains_against_pandas(scorecards, tmp_path):
    from vislens.findings import confidence_half_gains, halves_markdown

    one = scorecards["holds"][1]
    two = load_evidence(build(tmp_path / "two.h5", World(seed=5)))
    table = confidence_half_gains([one, two], n_boot=200)
    names = [c for c in one.order if c != one.baseline]
    assert list(table["condition"].unique()) == names
    expect = []
    for ev in (one, two):  # by hand: median split of each file's baseline confidence
        t = ev.table
        base = t[t.condition == ev.baseline].set_index("row")
        for c in names:
            x = t[t.condition == c].set_index("row")
            rows = base.index.intersection(x.index)
            low = base.confidence.loc[rows] < base.confidence.loc[rows].median()
            for half, sel in (("low", low), ("high", ~low)):
                expect.append(pd.DataFrame({"condition": c, "half": half,
                                            "b": base.correct.loc[rows][sel].astype(float),
                                            "a": x.correct.loc[rows][sel].astype(float)}))
    ref = pd.concat(expect)
    ref["d"] = ref.a - ref.b
    g = ref.groupby(["condition", "half"])
    for _, r in table.iterrows():
        sub = g.get_group((r.condition, r.half))
        assert r.n == len(sub)
        assert r.gain_pp == pytest.approx(100 * sub.d.mean())
        assert r.accuracy == pytest.approx(sub.a.mean())
        assert r.baseline_accuracy == pytest.approx(sub.b.mean())
        assert (r.fixed, r.broken) == ((sub.d > 0).sum(), (sub.d < 0).sum())
        assert r.ci_low <= r.gain_pp <= r.ci_high
    # the "holds" world is built so that F8 holds: its two cells are positive
    f8 = {f.id: f for f in run_findings([one], n_boot=200)}["F8"]
    own = confidence_half_gains([one], n_boot=200).set_index(["condition", "half"])
    gains = (own.loc[("scaling-0.5", "low"), "gain_pp"], own.loc[("scaling-2", "high"), "gain_pp"])
    assert f8.value == pytest.approx(min(gains))
    md = halves_markdown(table)
    assert md.count("\n") == 1 + len(names) and "`scaling-2`" in md
    with pytest.raises(Exception, match="nope"):
        confidence_half_gains([one], conditions=["nope"])


def test_cli_writes_confidence_halves(scorecards, tmp_path):
    from vislens.cli import main

    path = scorecards["holds"][1].path
    assert main(["findings", str(path), "--out", str(tmp_path / "f"), "--n-boot", "50"]) == 0
    halves = pd.read_csv(tmp_path / "f" / "confidence_halves.csv")
    assert set(halves["half"]) == {"low", "high"} and "scaling-0.5" in set(halves["condition"])
    assert "## Accuracy gain by confidence half" in (tmp_path / "f" / "findings.md").read_text()
    head = pd.read_csv(tmp_path / "f" / "scaling_headroom.csv")
    assert list(head["half"]) == ["low", "high"] and (head["conditions"] == 2).all()
    assert "## Headroom of ScalingVis by confidence half" in (tmp_path / "f" / "findings.md").read_text()


def test_scaling_headroom_against_pandas(scorecards, tmp_path):
    """Errors some alpha fixes, per half: a plain pandas computation on the same tables."""
    from vislens.findings import headroom_markdown, scaling_headroom

    one = scorecards["holds"][1]
    two = load_evidence(build(tmp_path / "two.h5", World(seed=5)))
    table = scaling_headroom([one, two])
    parts = []
    for ev in (one, two):
        t = ev.table
        base = t[t.condition == ev.baseline].set_index("row")
        wide = {c: t[t.condition == c].set_index("row").correct.astype(bool)
                for c in ("scaling-0.5", "scaling-2")}
        rows = base.index.intersection(wide["scaling-0.5"].index).intersection(wide["scaling-2"].index)
        conf = base.confidence.loc[rows]
        parts.append(pd.DataFrame({"low": conf < conf.median(), "b": base.correct.loc[rows].astype(bool),
                                   "sm": wide["scaling-0.5"].loc[rows], "sh": wide["scaling-2"].loc[rows]}))
    ref = pd.concat(parts)
    assert list(table["half"]) == ["low", "high"]
    for r in table.itertuples():
        x = ref[ref.low] if r.half == "low" else ref[~ref.low]
        wrong = ~x.b
        assert r.n == len(x) and r.baseline_errors == wrong.sum() > 0
        assert r.fixed_by_smoothing == (wrong & x.sm).sum()
        assert r.fixed_by_sharpening == (wrong & x.sh).sum()
        assert r.fixed_by_any == (wrong & (x.sm | x.sh)).sum()
        assert r.oracle_accuracy == pytest.approx((x.b | x.sm | x.sh).mean())
        assert r.conditions == 2
    # the "holds" world: smoothing fixes low-half errors only, sharpening high-half ones
    assert table.set_index("half").loc["low", "fixed_by_smoothing"] > 0
    assert table.set_index("half").loc["high", "fixed_by_sharpening"] > 0
    only = scaling_headroom([one], conditions=["scaling-2"]).set_index("half")
    assert (only["fixed_by_smoothing"] == 0).all()
    md = headroom_markdown(table)
    assert md.count("\n") == 3 and "| low |" in md
    with pytest.raises(VislensError, match="'add\\+1' in .* is not a ScalingVis"):
        scaling_headroom([one], conditions=["add+1"])
    with pytest.raises(VislensError, match="'nope'"):
        scaling_headroom([one], conditions=["nope"])


def test_f10_pairs_each_baseline_with_its_own_test_samples():
    """VCD and DoLa done on different test samples (e.g. one condition added to a capture
    later): each difference is paired on the samples done under both of its conditions."""
    import pandas as pd

    from vislens.findings import Evidence, _Ctx, f10_beats_contrastive

    n = 40
    split = np.where(np.arange(n) < 10, "val", "test")
    rng = np.random.default_rng(3)
    ok = {"scaling-2": rng.random(n) < 0.7, "vcd": rng.random(n) < 0.5, "dola": rng.random(n) < 0.4}
    done = {"scaling-2": np.ones(n, bool), "vcd": np.ones(n, bool), "dola": np.arange(n) < 30}
    table = pd.concat([pd.DataFrame({"row": np.flatnonzero(done[c]), "condition": c,
                                     "split": split[done[c]], "correct": ok[c][done[c]]})
                       for c in ok], ignore_index=True)
    attrs = {"scaling-2": {"method": "scaling", "alpha": 2.0}, "vcd": {"method": "vcd"},
             "dola": {"method": "dola"}}
    ev = Evidence(Path("c.h5"), table, attrs, list(ok), None, 4, pd.DataFrame({"split": split}),
                  None, None)
    value, lo, hi, size, why, verdict = f10_beats_contrastive([ev], _Ctx(200, 0, 0.95))
    test = split == "test"
    # plain reference: per baseline, mean over its own paired test samples
    gain = [100 * np.mean(ok["scaling-2"][test & done[b]].astype(float)
                          - ok[b][test & done[b]].astype(float)) for b in ("vcd", "dola")]
    assert value == pytest.approx(min(gain), rel=1e-12)
    assert size == int(test.sum()) and np.isfinite(lo) and lo <= value <= hi


# ----------------------------------------------------------------------------- review fixes


def _evidence(rows: dict, attrs: dict, split: np.ndarray, conf: np.ndarray | None = None,
              baseline: str | None = "baseline"):
    """An Evidence built from plain arrays: ``rows[c] = (done mask, correct)`` per condition."""
    from vislens.findings import Evidence

    n = split.size
    conf = np.full(n, 0.5) if conf is None else conf
    table = pd.concat([pd.DataFrame({"row": np.flatnonzero(done), "condition": c,
                                     "split": split[done], "correct": ok[done],
                                     "confidence": conf[done], "relation": "left"})
                       for c, (done, ok) in rows.items()], ignore_index=True)
    return Evidence(Path("c.h5"), table, attrs, list(rows), baseline, L,
                    pd.DataFrame({"split": split}), None, None)


def test_f2_counts_only_samples_done_under_both():
    """n (and the bootstrap) are the samples done under the baseline *and* the add condition,
    not every baseline sample: a handful of add rows is not testable."""
    from vislens.findings import _Ctx, f2_add_constant
    from vislens.metrics import bootstrap_indices, percentile_interval

    n = 40
    rng = np.random.default_rng(7)
    split = np.full(n, "test")
    base, add = rng.random(n) < 0.5, rng.random(n) < 0.6
    attrs = {"baseline": {"method": "baseline"}, "add+1": {"method": "add", "delta": 1.0}}
    few = _evidence({"baseline": (np.ones(n, bool), base), "add+1": (np.arange(n) < 8, add)},
                    attrs, split)
    found = {f.id: f for f in run_findings([few], n_boot=50)}["F2"]
    assert found.verdict == "not testable" and "only 8" in found.why, found
    done = np.arange(n) < 25
    ev = _evidence({"baseline": (np.ones(n, bool), base), "add+1": (done, add)}, attrs, split)
    value, lo, hi, size, why, verdict = f2_add_constant([ev], _Ctx(200, 0, 0.95))
    d = add[done].astype(float) - base[done].astype(float)  # plain paired differences
    assert size == 25 and value == pytest.approx(100 * d.mean(), rel=1e-12)
    reps = 100 * d[bootstrap_indices(25, 200, 0)].mean(axis=1)
    assert (lo, hi) == pytest.approx(percentile_interval(reps), rel=1e-12)


def test_f3_leaves_out_test_samples_without_an_overlap(scorecards):
    """A sample without a box (all-zero mask) has no overlap: F3's n and interval rest on
    the test samples whose overlap is defined, as the AUROC does."""
    import dataclasses

    from vislens.metrics import bootstrap_indices, percentile_interval

    ev = scorecards["fails"][1]  # an overlap unrelated to correctness: an interval with width
    st = ev.stats
    test = np.flatnonzero(st.split == "test")
    overlap = st.overlap.copy()
    overlap[test[::4]] = np.nan  # every 4th test sample has no box
    ev2 = dataclasses.replace(ev, stats=dataclasses.replace(st, overlap=overlap))
    f3 = {f.id: f for f in run_findings([ev2], n_boot=N_BOOT)}["F3"]
    layer = int(f3.why.split("layer ")[1].split()[0])
    ok = np.isfinite(overlap[:, layer]) & (st.split == "test")
    s, y = overlap[ok, layer], np.asarray(st.correct, bool)[ok]
    assert f3.n == int(ok.sum()) == test.size - test[::4].size
    assert f3.value == pytest.approx(roc_auc_score(y, s))
    reps = np.array([roc_auc_score(y[i], s[i]) if 0 < y[i].sum() < i.size else np.nan
                     for i in bootstrap_indices(s.size, N_BOOT, 0)])
    assert f3.ci_low < f3.ci_high
    assert (f3.ci_low, f3.ci_high) == pytest.approx(percentile_interval(reps), rel=1e-9)
    v = np.isfinite(overlap[:, layer]) & (st.split == "val")
    assert f"chosen on {int(v.sum())} validation samples" in f3.why


def test_f4_resamples_within_each_file_and_relation(tmp_path):
    """Pooled captures: F4's bootstrap keeps each capture file's count of each relation
    (docs/findings.md), checked against a plain scikit-learn loop over the same resamples."""
    from vislens.findings import _relation_word
    from vislens.metrics import bootstrap_indices, percentile_interval

    evs = [load_evidence(build(tmp_path / f"r{k}.h5", World(overlap="none", seed=20 + k, n=120)),
                         chunk=64)
           for k in range(2)]
    f4 = {f.id: f for f in run_findings(evs, n_boot=N_BOOT)}["F4"]
    layer = int(f4.why.split("at layer ")[1].split(";")[0])
    sts = [ev.stats for ev in evs]
    s = np.concatenate([st.overlap[:, layer] for st in sts])
    y = np.concatenate([np.asarray(st.correct, bool) for st in sts])
    rel = np.array([_relation_word(r) for st in sts for r in st.relation])
    files = np.concatenate([np.full(len(st.rows), k) for k, st in enumerate(sts)])
    t = (np.concatenate([st.split for st in sts]) == "test") & np.isfinite(s)
    keep = [r for r in pd.unique(rel[t]) if min(y[t & (rel == r)].sum(), (~y[t & (rel == r)]).sum()) >= 5]
    sel = t & np.isin(rel, keep)
    s, y, rel, files = s[sel], y[sel], rel[sel], files[sel]
    assert f4.n == sel.sum() and len(set(files)) == 2 and f4.ci_low < f4.ci_high
    assert f4.value == pytest.approx(np.mean([roc_auc_score(y[rel == r], s[rel == r]) for r in keep]))
    strata = np.char.add(files.astype(str), np.char.add(":", rel))
    reps = []
    for i in bootstrap_indices(s.size, N_BOOT, 0, strata):
        per = [roc_auc_score(y[i][rel[i] == r], s[i][rel[i] == r])
               if 0 < y[i][rel[i] == r].sum() < (rel[i] == r).sum() else np.nan for r in keep]
        reps.append(np.mean(per))
    assert (f4.ci_low, f4.ci_high) == pytest.approx(percentile_interval(np.array(reps)), rel=1e-9)


def test_f8_is_the_two_cells_of_its_table_when_conditions_differ_in_done_rows():
    """The sharpening condition done on fewer samples (an unfinished capture): the halves are
    still split at the median of the baseline's confidence, each gain is paired on the
    samples done under its own condition, and F8 equals its two cells of the table."""
    from vislens.findings import _Ctx, confidence_half_gains, f8_confidence_halves

    n = 60
    rng = np.random.default_rng(11)
    conf = rng.permutation(np.linspace(0.3, 0.9, n))
    split = np.full(n, "test")
    base = rng.random(n) < 0.5
    ok = {"scaling-0.5": rng.random(n) < 0.7, "scaling-2": rng.random(n) < 0.7}
    done_sh = np.arange(n) < 40  # 20 samples not done under sharpening
    attrs = {"baseline": {"method": "baseline"},
             "scaling-0.5": {"method": "scaling", "alpha": 0.5},
             "scaling-2": {"method": "scaling", "alpha": 2.0}}
    ev = _evidence({"baseline": (np.ones(n, bool), base),
                    "scaling-0.5": (np.ones(n, bool), ok["scaling-0.5"]),
                    "scaling-2": (done_sh, ok["scaling-2"])}, attrs, split, conf)
    low = conf < np.median(conf)  # plain reference: the baseline's median, all its samples
    gain_sm = 100 * np.mean(ok["scaling-0.5"][low].astype(float) - base[low])
    high_sh = ~low & done_sh
    gain_sh = 100 * np.mean(ok["scaling-2"][high_sh].astype(float) - base[high_sh])
    value, lo, hi, size, why, verdict = f8_confidence_halves([ev], _Ctx(200, 0, 0.95))
    assert value == pytest.approx(min(gain_sm, gain_sh), rel=1e-12)
    assert size == low.sum() + high_sh.sum()
    table = confidence_half_gains([ev], n_boot=200).set_index(["condition", "half"])
    assert table.loc[("scaling-0.5", "low"), "gain_pp"] == pytest.approx(gain_sm, rel=1e-12)
    assert table.loc[("scaling-2", "high"), "gain_pp"] == pytest.approx(gain_sh, rel=1e-12)
    assert table.loc[("scaling-2", "high"), "n"] == high_sh.sum()
    assert table.loc[("scaling-2", "low"), "n"] == (low & done_sh).sum()


def test_f10_ties_on_validation_go_to_the_first_condition_in_the_file():
    """Equal validation accuracy: the condition first in the file is chosen (as for F9), even
    when it is an AdaptVis condition written before the ScalingVis one."""
    from vislens.findings import _Ctx, f10_beats_contrastive

    n = 50
    split = np.where(np.arange(n) < 10, "val", "test")
    rng = np.random.default_rng(5)
    val_ok = np.arange(n) < 6  # both right on the same 6 of the 10 validation samples
    ok = {"adaptvis": np.where(split == "val", val_ok, rng.random(n) < 0.8),
          "scaling-2": np.where(split == "val", val_ok, rng.random(n) < 0.3),
          "vcd": rng.random(n) < 0.5}
    attrs = {"adaptvis": {"method": "adaptvis"}, "scaling-2": {"method": "scaling", "alpha": 2.0},
             "vcd": {"method": "vcd"}}
    ev = _evidence({c: (np.ones(n, bool), ok[c]) for c in ok}, attrs, split, baseline=None)
    value, lo, hi, size, why, verdict = f10_beats_contrastive([ev], _Ctx(100, 0, 0.95))
    test = split == "test"
    assert "adaptvis vs vcd" in why, why
    assert value == pytest.approx(100 * np.mean(ok["adaptvis"][test].astype(float)
                                                - ok["vcd"][test]), rel=1e-12)
