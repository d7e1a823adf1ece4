"""``vislens sweep``: flag parsing, the offline selection against brute force, and a full run."""
from __future__ import annotations

import itertools
import json
import math
import numpy as np
import pandas as pd
import pytest

from vislens import sweep
from vislens.errors import VislensError
from vislens.sweep import ValResults

# ----------------------------------------------------------------------------- flags


def test_betas_range_is_inclusive_and_exact():
    assert sweep.parse_betas("0.20:0.55:0.05") == (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55)
    assert sweep.parse_betas("0.2:0.5:0.1") == (0.2, 0.3, 0.4, 0.5)  # 0.2 + 3*0.1 > 0.5 in floats
    assert sweep.parse_betas("0:1:0.1") == tuple(k / 10 for k in range(11))
    assert sweep.parse_betas("0.3:0.3:0.1") == (0.3,)
    assert sweep.parse_betas("0.5, 0.1,0.5") == (0.1, 0.5)
    assert sweep.parse_betas([0.4, "0.2"]) == (0.2, 0.4)
    assert sweep.parse_values("--alphas", "2,0.5,2") == (0.5, 2.0)


@pytest.mark.parametrize("kw, flag", [
    (dict(alphas="0.5,x"), "--alphas"),
    (dict(alphas="0,1.5"), "--alphas"),
    (dict(alphas="-1"), "--alphas"),
    (dict(alphas=""), "--alphas"),
    (dict(alpha1="nan"), "--alpha1"),
    (dict(alpha2="inf"), "--alpha2"),
    (dict(betas="1.2"), "--betas"),
    (dict(betas="-0.1,0.3"), "--betas"),
    (dict(betas="0.5:0.2:0.1"), "--betas"),
    (dict(betas="0.2:0.5:0"), "--betas"),
    (dict(betas="0.2:0.5"), "--betas"),
    (dict(betas="0.2::0.1"), "--betas"),
    (dict(betas="0.2:0.9:a"), "--betas"),
    (dict(baselines="vcd,beam"), "--baselines"),
    (dict(alpha1="1.5", alpha2="1.2"), "--alpha1/--alpha2"),
])
def test_bad_flags_give_one_line_naming_the_flag(kw, flag):
    with pytest.raises(VislensError) as err:
        sweep.make_grid(**kw, log=lambda m: None)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_alpha1_above_alpha2_warns_and_skips_the_pair():
    logged: list[str] = []
    grid = sweep.make_grid(alpha1="0.5,1.5", alpha2="1.2,2", log=logged.append)
    assert grid.pairs == [(0.5, 1.2), (0.5, 2.0), (1.5, 2.0)]
    assert grid.skipped_pairs == [(1.5, 1.2)]
    assert len(logged) == 1 and logged[0].startswith("warning: --alpha1/--alpha2")
    assert grid.scaling_alphas == (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
    assert grid.run_alphas == (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
    assert sweep.parse_baselines("dola, vcd,dola") == ("dola", "vcd")
    assert sweep.parse_baselines("none") == ()


def test_flags_are_checked_before_the_model_is_loaded(tmp_path):
    argv = ["--model", str(tmp_path / "no-such-model"), "--dataset", "jsonl:/no/such.jsonl",
            "--out", str(tmp_path / "o")]
    with pytest.raises(VislensError, match="^--betas"):
        sweep.main(argv + ["--betas", "0.1:2:0.5"])
    with pytest.raises(VislensError, match="^--max-new-tokens"):
        sweep.main(argv + ["--max-new-tokens", "0"])
    with pytest.raises(VislensError, match="such.jsonl"):  # the dataset, still not the model
        sweep.main(argv)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- selection

ALPHAS = (0.5, 0.8, 1.0, 1.2, 2.0)
#: confidences with repeats, and values equal to betas (Eq. 3's boundary: not below -> alpha2)
CONF = [0.10, 0.30, 0.30, 0.45, 0.50, 0.70, 0.90, 0.30]
#: rows = samples, columns = ALPHAS
CORRECT = [
    [1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1],  # conf 0.3: only the sharpening alphas are right
    [1, 0, 0, 0, 1],
    [0, 1, 1, 1, 0],
    [1, 1, 1, 0, 0],  # conf 0.5
    [0, 0, 1, 1, 1],
    [0, 1, 1, 1, 1],
    [0, 0, 1, 0, 1],
]


def hand_table(conf=CONF, correct=CORRECT) -> ValResults:
    n = len(conf)
    samples = pd.DataFrame({"id": [f"s{i}" for i in range(n)], "relation": "left", "group": "",
                            "answer": "Left", "confidence": conf})
    corr = np.array(correct, dtype=bool).reshape(n, len(ALPHAS))
    preds = np.where(corr, "Left", "Right").astype(object)
    return ValResults(samples, ALPHAS, preds, corr)


def brute_force(pairs, betas, conf=CONF, correct=CORRECT):
    """Independent loops: per setting the hits, and the winner under the documented tie rule."""
    scores = {}
    for (a1, a2), beta in itertools.product(pairs, betas):
        used = [a1 if c < beta else a2 for c in conf]
        hits = sum(correct[i][ALPHAS.index(a)] for i, a in enumerate(used))
        strength = sum(abs(math.log(a)) for a in used) / len(used)
        scores[(a1, a2, beta)] = (hits, strength)

    def key(s):
        a1, a2, beta = s
        hits, strength = scores[s]
        return (-hits, round(strength, 12), round(abs(math.log(a1)) + abs(math.log(a2)), 12),
                beta, a1, a2)

    return scores, min(scores, key=key)


#: yes/no validation table: gold yes at conf 0.9, 0.7, 0.3 (mean 0.6333...), gold no at
#: 0.6, 0.4, 0.5, 0.2 (mean 0.425) -> the paper's VSR beta = (0.63333 + 0.425) / 2 = 0.529166...
YN_CONF = [0.9, 0.7, 0.3, 0.6, 0.4, 0.5, 0.2]
YN_GOLD = ["Yes", "Yes", "yes", "No", "No", "no", "No"]


def yes_no_table() -> ValResults:
    t = hand_table(conf=YN_CONF, correct=CORRECT[:len(YN_CONF)])
    t.samples["answer"] = YN_GOLD
    return t


def test_vsr_beta_rule_is_the_mean_of_the_two_labels_average_confidences():
    val = yes_no_table()
    beta = ((0.9 + 0.7 + 0.3) / 3 + (0.6 + 0.4 + 0.5 + 0.2) / 4) / 2  # by hand: 0.5291666...
    assert sweep.label_mean_beta(val) == pytest.approx(beta, rel=1e-12)
    assert sweep.resolve_beta_rule(val) == "label-mean"
    assert sweep.resolve_beta_rule(hand_table()) == "grid"  # four-option data keeps the grid
    grid = sweep.make_grid("0.5,2.0", "0.5,0.8", "1.2,2.0", "0.2,0.4")
    choice = sweep.choose(val, grid)
    assert choice.beta_rule == "label-mean" and choice.beta == pytest.approx(beta, rel=1e-12)
    assert set(choice.adaptvis["beta"]) == {choice.beta} and len(choice.adaptvis) == len(grid.pairs)
    # each pair's accuracy by hand: conf < beta (0.3, 0.4, 0.5, 0.2) takes alpha1's answer
    correct = CORRECT[:len(YN_CONF)]
    for r in choice.adaptvis.itertuples():
        used = [r.alpha1 if c < beta else r.alpha2 for c in YN_CONF]
        assert r.n_correct == sum(correct[i][ALPHAS.index(a)] for i, a in enumerate(used))
    # the grid rule searches --betas as for four-option data
    gridded = sweep.choose(val, grid, "grid")
    assert gridded.beta_rule == "grid" and set(gridded.adaptvis["beta"]) == {0.2, 0.4}
    with pytest.raises(VislensError, match="gold answer 'no'"):
        sweep.label_mean_beta(ValResults(
            pd.DataFrame({"id": ["a", "b"], "relation": "", "group": "", "answer": ["yes", "Yes"],
                          "confidence": [0.5, 0.6]}), ALPHAS, np.full((2, 5), "yes", object),
            np.ones((2, 5), bool)))
    with pytest.raises(VislensError, match="yes/no"):
        sweep.choose(hand_table(), grid, "label-mean")
    with pytest.raises(VislensError, match="--beta-rule"):
        sweep.choose(val, grid, "median")


def test_offline_adaptvis_matches_brute_force_including_ties_and_the_boundary():
    val = hand_table()
    pairs = [(0.5, 1.2), (0.5, 2.0), (0.8, 1.2), (0.8, 2.0), (1.0, 2.0)]
    betas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 1.0]
    got = sweep.adaptvis_scores(val, pairs, betas)
    want, best = brute_force(pairs, betas)
    assert len(got) == len(want)
    for r in got.itertuples():
        hits, strength = want[(r.alpha1, r.alpha2, r.beta)]
        assert r.n_correct == hits and r.acc == pytest.approx(100 * hits / len(CONF))
        assert r.mean_abs_log_alpha == pytest.approx(strength, abs=1e-12)
        assert r.n_below_beta == sum(c < r.beta for c in CONF)
    # the boundary by hand: at beta=0.3 the three samples with confidence 0.3 take alpha2
    row = got[(got.alpha1 == 0.5) & (got.alpha2 == 2.0) & (got.beta == 0.3)].iloc[0]
    assert row.n_below_beta == 1
    assert row.n_correct == 1 + 1 + 1 + 0 + 0 + 1 + 1 + 1
    below = got[(got.alpha1 == 0.5) & (got.alpha2 == 2.0) & (got.beta == 0.4)].iloc[0]
    assert below.n_correct == 1 + 0 + 1 + 0 + 0 + 1 + 1 + 0  # now they take alpha1
    pick = sweep.pick_adaptvis(got)
    assert (pick.alpha1, pick.alpha2, pick.beta) == best
    # the grid has ties at the top, so the rule (not luck) picked it
    top = got[got.n_correct == got.n_correct.max()]
    assert len(top) > 1


@pytest.mark.parametrize("seed", range(20))
def test_offline_adaptvis_random_tables_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    conf = [float(x) for x in rng.choice([0.1, 0.2, 0.25, 0.3, 0.5, 0.9], size=n)]
    correct = rng.integers(0, 2, size=(n, len(ALPHAS))).tolist()
    pairs = [(a1, a2) for a1 in (0.5, 0.8, 1.0) for a2 in (1.0, 1.2, 2.0)]
    betas = [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0]
    got = sweep.adaptvis_scores(hand_table(conf, correct), pairs, betas)
    want, best = brute_force(pairs, betas, conf, correct)
    assert got.n_correct.tolist() == [want[(r.alpha1, r.alpha2, r.beta)][0] for r in got.itertuples()]
    pick = sweep.pick_adaptvis(got)
    assert (pick.alpha1, pick.alpha2, pick.beta) == best


def _scaling(hits: dict[float, int], n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({"alpha": list(hits), "n": n, "n_correct": list(hits.values()),
                         "acc": [100 * h / n for h in hits.values()]})


def test_best_alpha_pick():
    assert sweep.pick_scaling(_scaling({0.5: 3, 0.8: 7, 1.0: 5, 2.0: 6})).alpha == 0.8
    # ties: closest to no intervention in |ln alpha|; alpha 1 wins any tie it is in
    assert sweep.pick_scaling(_scaling({0.5: 7, 1.2: 7, 1.0: 5})).alpha == 1.2
    assert sweep.pick_scaling(_scaling({0.5: 7, 0.8: 7, 1.0: 7, 2.0: 7})).alpha == 1.0
    assert sweep.pick_scaling(_scaling({2.0: 6, 0.5: 6, 1.0: 1})).alpha == 0.5  # equal |ln|
    val = hand_table()
    scores = sweep.scaling_scores(val, ALPHAS)
    assert scores.n_correct.tolist() == np.array(CORRECT).sum(0).tolist()
    choice = sweep.choose(val, sweep.make_grid(alphas="0.5,0.8,1.2,2", alpha1="0.5,0.8",
                                                alpha2="1.2,2", betas="0:1:0.1"))
    assert choice.alpha == 1.0  # 5 of 8 like alpha 2: the tie goes to no intervention
    assert choice.greedy.alpha == 1.0
    assert choice.scaling.chosen.sum() == 1 and choice.adaptvis.chosen.sum() == 1


def test_val_results_csv_round_trip(tmp_path):
    val = hand_table()
    val.samples["confidence"] = [0.1 + 1e-13 * i + 1 / 3 for i in range(len(CONF))]
    val.predictions[0, 0] = ""  # empty generations survive
    path = tmp_path / "v.csv"
    val.to_frame().to_csv(path, index=False)
    back = sweep.read_val_results(path)
    assert back.alphas == ALPHAS
    assert back.confidence.tolist() == val.confidence.tolist()  # exact floats
    assert (back.correct == val.correct).all() and (back.predictions == val.predictions).all()
    assert back.samples["id"].tolist() == val.samples["id"].tolist()


def test_table1_frame_for_yes_no_data():
    acc = pd.DataFrame({"n": [4, 4], "acc": [50.0, 75.0]},
                       index=pd.Index(["baseline", "adaptvis"], name="condition"))
    vsr = pd.DataFrame({"condition": ["baseline", "adaptvis"], "f1": [0.5, 0.8],
                        "f1_paper": [0.4, 0.7]})
    t = sweep.table1_frame(acc, vsr, {"greedy": "baseline", "adaptvis": "adaptvis"})
    assert list(t.columns) == ["condition", "n", "acc", "acc_low", "acc_high", "acc_delta",
                               "f1", "f1_delta", "f1_paper", "f1_paper_delta"]
    assert t.loc["adaptvis", "acc_delta"] == 25.0
    for cond, k in (("greedy", 2), ("adaptvis", 3)):  # Wilson 95% by its formula, n = 4
        z, n = 1.959963984540054, 4
        p = k / n
        centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        want = (100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n))
        assert (t.loc[cond, "acc_low"], t.loc[cond, "acc_high"]) == pytest.approx(want, rel=1e-9)
    assert t.loc["adaptvis", "f1"] == pytest.approx(80.0)
    assert t.loc["adaptvis", "f1_paper_delta"] == pytest.approx(30.0)
    md = sweep.table1_markdown(t, "T")
    assert "| adaptvis |" in md and "+25.0" in md
    assert f"75.0 [{t.loc['adaptvis', 'acc_low']:.1f}, {t.loc['adaptvis', 'acc_high']:.1f}]" in md


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vislens.synth import generate_groups, write_scenes

    out = tmp_path_factory.mktemp("sweep-scenes")
    return write_scenes(generate_groups(10, "a", seed=11), out, name="a.jsonl")


@pytest.fixture(scope="module")
def answering_adapter(tiny_dir):
    """A private tiny LLaVA whose output head favours the four answer words.

    A random tiny model almost never says Left/Right/On/Under, so every accuracy would be 0;
    random, fairly large output rows for those words give answers (and confidences between
    0.1 and 0.6) that vary with the image and with alpha.
    """
    import torch

    from vislens.models import load_model

    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    ids = adapter.tokenizer.convert_tokens_to_ids(["Left", "Right", "On", "Under"])
    head = adapter.model.get_output_embeddings().weight
    with torch.no_grad():
        head[ids] = 0.75 * torch.randn(4, head.shape[1], generator=torch.Generator().manual_seed(0))
    return adapter


def _independent_table1(tab: pd.DataFrame) -> dict[str, dict[str, float]]:
    """acc / pair / set accuracy (percent) per condition from the capture's answers."""
    out = {}
    for cond, part in tab.groupby("condition"):
        ok = {(g, r.lower()): bool(c) for g, r, c in zip(part.group, part.relation, part.correct)}
        groups = sorted(set(part.group))
        pairs = [all(ok[(g, r)] for r in pair) for g in groups
                 for pair in (("left", "right"), ("on", "under"))]
        sets = [all(ok[(g, r)] for r in ("left", "right", "on", "under")) for g in groups]
        out[cond] = {"acc": 100 * part.correct.mean(), "pair_acc": 100 * np.mean(pairs),
                     "set_acc": 100 * np.mean(sets), "n": len(part)}
    return out


def test_run_sweep_end_to_end(answering_adapter, scenes, tmp_path):
    from vislens.capture import _open_image, is_correct, select_samples
    from vislens.decoding import DecodingEngine, parse_condition
    from vislens.store import open_capture

    adapter = answering_adapter
    dataset = f"jsonl:{scenes}"
    logged: list[str] = []
    res = sweep.run_sweep(model=adapter, dataset=dataset, out=tmp_path / "sw",
                          baselines="dola,vcd", max_new_tokens=3, batch_size=8, matcher="first-word",
                          progress=False, log=logged.append)
    out = tmp_path / "sw"
    for name in ("val_results.csv", "val_scaling.csv", "val_adaptvis.csv", "val_curves.png",
                 "chosen.json", "test.h5", "table1.csv", "table1.md"):
        assert (out / name).is_file(), name
    assert (out / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["scalingvis"]["alpha"] == res.choice.alpha
    assert chosen["grid"]["betas"] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55]

    # Table 1 equals a recomputation from the test capture
    table = pd.read_csv(out / "table1.csv", index_col="method")
    assert list(table.index) == ["greedy", "scalingvis", "adaptvis", "vcd", "dola"]
    assert table.loc["vcd", "condition"].startswith("vcd:")
    assert table.loc["dola", "condition"] == "dola:layers=high"
    with open_capture(out / "test.h5") as cap:
        tab = cap.table()
        assert set(tab.split) == {"test"}
        ad = cap.attrs
        cattrs = {c: cap.condition_attrs(c) for c in cap.conditions}
    assert ad["split"] == "test" and ad["max_new_tokens"] == 3
    ref = _independent_table1(tab)
    names = {"greedy": "baseline", "scalingvis": "scalingvis", "adaptvis": "adaptvis",
             "vcd": "vcd", "dola": "dola"}
    for method, cond in names.items():
        for m in ("acc", "pair_acc", "set_acc"):
            assert table.loc[method, m] == pytest.approx(ref[cond][m])
            assert table.loc[method, f"{m}_delta"] == pytest.approx(ref[cond][m] - ref["baseline"][m])
        assert table.loc[method, "n"] == ref[cond]["n"] == 32
    assert table.loc["adaptvis", "condition"] == (
        f"adaptvis:alpha1={res.choice.alpha1!r},alpha2={res.choice.alpha2!r},beta={res.choice.beta!r}")
    assert (cattrs["adaptvis"]["alpha1"], cattrs["adaptvis"]["alpha2"], cattrs["adaptvis"]["beta"]) \
        == (res.choice.alpha1, res.choice.alpha2, res.choice.beta)
    assert cattrs["scalingvis"]["alpha"] == res.choice.alpha
    assert "| adaptvis |" in (out / "table1.md").read_text()

    # the offline AdaptVis numbers equal real AdaptVis runs through the engine, for every setting
    val_samples, _ = select_samples(dataset, None, split="val")
    grid = pd.read_csv(out / "val_adaptvis.csv")
    assert len(grid) == 6 * 8 and grid.chosen.sum() == 1
    conds = [parse_condition(f"adaptvis:alpha1={r.alpha1!r},alpha2={r.alpha2!r},"
                             f"beta={r.beta!r},name=s{k}") for k, r in enumerate(grid.itertuples())]
    engine = DecodingEngine(adapter, max_new_tokens=3, record=False)
    hits = np.zeros(len(conds), dtype=int)
    val_table = pd.read_csv(out / "val_results.csv", dtype=str, keep_default_na=False)
    for start in range(0, len(val_samples), 8):
        batch = val_samples[start:start + 8]
        results = engine.run([_open_image(s) for s in batch], [s.question for s in batch],
                             [s.options for s in batch], conds, sample_keys=[s.id for s in batch])
        for j, (s, rs) in enumerate(zip(batch, results)):
            row = val_table.iloc[start + j]
            assert row["id"] == s.id
            for k, c in enumerate(conds):
                r = rs[c.name]
                hits[k] += is_correct(r.text, s, "first-word")
                assert r.text == row[f"prediction_{r.alpha_used!r}"]
    assert hits.tolist() == grid.n_correct.tolist()
    best = grid[grid.chosen].iloc[0]
    assert chosen["adaptvis"]["val_correct"] == best.n_correct
    assert (best.alpha1, best.alpha2, best.beta) == (res.choice.alpha1, res.choice.alpha2,
                                                     res.choice.beta)
    assert res.val.alphas == (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
    # the check above is not vacuous: answers are sometimes right and confidences straddle betas
    assert len(res.val) == 8 and res.val.correct.any()
    conf = res.val.confidence
    assert (conf < 0.2).any() and (conf > 0.3).any()
    assert any(m.startswith("[sweep 2/3] chosen") for m in logged)


@pytest.mark.parametrize("rule", ["grid", "label-mean"])
def test_val_curves_figure_is_readable(rule, tmp_path):
    from vislens.metrics import wilson_interval

    val = yes_no_table()
    choice = sweep.choose(val, sweep.make_grid("0.5,2.0", "0.5,0.8", "1.2,2.0", "0.2,0.4,0.6"),
                          rule)
    fig = sweep.curves_figure(choice, "Controlled_A: validation split")
    ax_s, ax_a = fig.axes[:2]
    assert fig._suptitle.get_text() == "Controlled_A: validation split"
    for ax in (ax_s, ax_a):  # legends outside the axes, to the right
        assert ax.get_legend()._loc == 2 and ax.get_legend().get_bbox_to_anchor().x0 > \
            ax.get_window_extent().x1 - 1
    # the ScalingVis band is the Wilson interval of each validation accuracy
    band = ax_s.collections[0].get_paths()[0].vertices[:, 1]
    lo, hi = wilson_interval(choice.scaling["n_correct"].to_numpy(), choice.scaling["n"].to_numpy())
    assert np.isclose(band.min(), 100 * np.min(lo)) and np.isclose(band.max(), 100 * np.max(hi))
    curves = [l for l in ax_a.get_lines() if l.get_label().startswith("α1=")]
    if rule == "grid":  # the chosen curve is drawn last and thicker
        assert curves[-1].get_label().endswith("(chosen)")
        assert curves[-1].get_linewidth() > max(l.get_linewidth() for l in curves[:-1])
    else:
        assert "yes/no rule" in ax_a.get_title()
    assert sweep.plot_curves(choice, tmp_path / "c.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def yes_no_scenes(tmp_path_factory):
    """A yes/no (VSR-style) JSONL dataset of random images, both answers on each split."""
    from conftest import random_image

    out = tmp_path_factory.mktemp("yes-no")
    recs = []
    for k in range(10):
        random_image(80 + k).save(out / f"i{k}.png")
        recs.append({"id": f"yn{k}", "image": f"i{k}.png", "options": ["Yes", "No"],
                     "question": "Is the ball on the box? Answer with yes or no.",
                     "answer": "Yes" if k % 2 else "No", "split": "val" if k < 4 else "test"})
    path = out / "yn.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def test_betas_that_the_beta_rule_would_not_use_are_refused(answering_adapter, yes_no_scenes,
                                                             tmp_path):
    """On yes/no data the label-mean rule (auto's choice there) sets beta itself: --betas
    given with it would be ignored, so it is refused before the model runs; the grid rule
    uses them, and leaving --betas out keeps the label-mean rule working."""
    kw = dict(model=answering_adapter, dataset=f"jsonl:{yes_no_scenes}", max_new_tokens=1,
              batch_size=4, baselines="", progress=False, log=lambda m: None,
              alphas="0.5,2", alpha1="0.5", alpha2="2")
    for rule in ("auto", "label-mean"):
        with pytest.raises(VislensError, match=r"^--betas '0.3,0.4': .*label-mean") as e:
            sweep.run_sweep(out=tmp_path / rule, betas="0.3,0.4", beta_rule=rule, **kw)
        assert "\n" not in str(e.value) and not (tmp_path / rule).exists()
    grid = sweep.run_sweep(out=tmp_path / "grid", betas="0.3,0.4", beta_rule="grid", **kw)
    assert grid.choice.beta_rule == "grid" and set(grid.choice.adaptvis["beta"]) == {0.3, 0.4}
    auto = sweep.run_sweep(out=tmp_path / "auto", **kw)
    assert auto.choice.beta_rule == "label-mean"
    assert auto.choice.beta == pytest.approx(sweep.label_mean_beta(auto.val), rel=1e-12)
    with pytest.raises(VislensError, match="^--betas"):
        sweep.main(["--model", str(tmp_path / "none"), "--dataset", f"jsonl:{yes_no_scenes}",
                    "--out", str(tmp_path / "cli"), "--betas", "0.3"])
