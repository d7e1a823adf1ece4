"""The model organism: architecture, a fast training run of the small variant, the artefact."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vislens.organism import DEFAULT_PATH, RELATION_WEIGHTS

SMALL_STEPS = 20
SMALL_BATCH = 4


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The small variant trained for a few steps through the real training code path."""
    from vislens.organism import train_organism

    out = tmp_path_factory.mktemp("organism") / "small"
    stats = train_organism(out, seed=3, steps=SMALL_STEPS, batch_size=SMALL_BATCH, lr=3e-3,
                           small=True, log=None, threads=1)
    return out, stats


@pytest.fixture(scope="module")
def organism_init():
    """The real organism's architecture with its wired init, untrained."""
    from vislens.organism import build_organism

    model, proc = build_organism(seed=0)
    return model, proc


def test_architecture_is_llava_15_shaped(organism_init):
    from vislens.organism import count_parameters
    from vislens.synth import generate_scenes, object_names

    model, proc = organism_init
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == 24
    assert cfg.image_seq_length == 576 and cfg.vision_feature_layer == -2
    tok = proc.tokenizer
    scene = generate_scenes(1, "b", seed=0)[0]
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": scene.sample.question}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == f"USER: <image>\n{scene.sample.question} ASSISTANT:"
    for word in object_names() + ["Left", "Right", "On", "Under", "Front", "Behind"]:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word
    enc = proc(images=[scene.image], text=[prompt], return_tensors="pt")
    ids = enc["input_ids"][0]
    assert int((ids == cfg.image_token_id).sum()) == 576
    assert tok.unk_token_id not in ids.tolist()
    n = count_parameters(model)
    assert n["total"] == sum(p.numel() for p in model.parameters()) < 5_000_000


def test_wired_init_looks_at_the_named_objects(organism_init):
    """Before training, the answer position finds the subject and reference names (layer 0)
    and then their patches (layer 1), which is what makes minutes of CPU training enough."""
    import torch

    from vislens.organism.build import _cell_owners
    from vislens.organism.config import prompt as _prompt
    from vislens.synth import generate_scenes

    model, proc = organism_init
    model.set_attn_implementation("eager")
    scenes = generate_scenes(4, "a", seed=21) + generate_scenes(4, "b", seed=21)
    enc = proc(images=[s.image for s in scenes], text=[_prompt(s.sample.question) for s in scenes],
               return_tensors="pt", padding=True)
    with torch.no_grad():
        att = model(**enc, output_attentions=True).attentions
    ids = enc["input_ids"]
    image = (ids[0] == model.config.image_token_id).nonzero().flatten()
    names, own = [], []
    for b, s in enumerate(scenes):
        toks = proc.tokenizer.convert_ids_to_tokens(ids[b].tolist())
        subj, ref = (toks.index(o) for o in s.sample.objects)
        names.append([float(att[0][b, 0, -1, subj]), float(att[0][b, 1, -1, ref])])
        owner = _cell_owners(s, 24)
        own.append([float(att[1][b, h, -1, image][torch.from_numpy(owner == h)].sum())
                    for h in (0, 1)])
    assert np.mean(names) > 0.9
    assert np.mean(own) > 0.5  # the 2 objects cover ~5% of the grid
    model.set_attn_implementation("sdpa")


def test_small_training_loss_falls(small_run):
    _, stats = small_run
    losses = stats["losses"]
    assert len(losses) == SMALL_STEPS and stats["steps"] == SMALL_STEPS
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert stats["n_scenes"] == SMALL_STEPS * SMALL_BATCH


def test_training_is_seeded(tmp_path, small_run):
    from vislens.organism import train_organism

    again = train_organism(tmp_path / "again", seed=3, steps=SMALL_STEPS, batch_size=SMALL_BATCH,
                           lr=3e-3, small=True, log=None, threads=1)
    assert again["losses"] == small_run[1]["losses"]


def test_small_organism_loads_and_answers(small_run):
    from vislens.decoding import run_conditions
    from vislens.models import load_model
    from vislens.synth import OPTIONS, generate_groups

    path, _ = small_run
    assert (path / "training.json").exists()
    adapter = load_model(path, dtype="float32", device="cpu")
    scenes = generate_groups(1, "a", seed=5)
    res = run_conditions(adapter, [s.image for s in scenes], [s.sample.question for s in scenes],
                         [OPTIONS["a"]] * len(scenes), ["baseline", "scaling:alpha=2"],
                         max_new_tokens=3)
    assert len(res) == 4
    for r in res:
        base = r["baseline"]
        assert isinstance(base.text, str) and 0 < base.confidence <= 1
        assert base.option_probs.shape == (4,)
        assert base.image_attention.shape == (adapter.num_layers, adapter.num_heads, 24, 24)
        assert not np.allclose(r["scaling-2"].image_attention, base.image_attention)


def test_small_evaluation_table(small_run):
    from vislens.organism import evaluate_organism, write_model_card

    path, stats = small_run
    df = evaluate_organism(path, n_groups=2, seed=11)
    assert list(df["relation"]) == ["left", "right", "on", "under", "all",
                                    "left", "right", "front", "behind", "all"]
    assert df["n"].tolist() == [2, 2, 2, 2, 8] * 2
    assert df["accuracy"].between(0, 1).all() and df["confidence"].between(0, 1).all()
    card = write_model_card(path, stats, df, {"n_groups": 2, "seed": 11})
    text = card.read_text()
    assert "| subset | relation |" in text and "vislens organism train" in text
    # the small variant's own grid (image 32, patch 2), not the full organism's 24x24 / 576
    assert "the 16x16 grid they cover" in text and "256 mostly-background tokens" in text
    assert "24x24" not in text and "576" not in text and " --small" in text
    meta = json.loads((path / "organism.json").read_text())
    assert meta["eval"]["n_groups"] == 2 and len(meta["eval"]["table"]) == 10


@pytest.mark.skipif(not (DEFAULT_PATH / "config.json").exists(), reason="no committed organism")
def test_committed_organism_matches_its_card():
    from vislens.models import load_model
    from vislens.organism import count_parameters, evaluate_organism

    weights = list(DEFAULT_PATH.glob("*.safetensors"))
    assert weights and sum(f.stat().st_size for f in weights) <= 20 * 2 ** 20
    meta = json.loads((DEFAULT_PATH / "organism.json").read_text())
    card = (DEFAULT_PATH / "README.md").read_text()
    assert f"{meta['final_loss']:.4f}" in card
    adapter = load_model(DEFAULT_PATH, dtype="float32", device="cpu")
    assert count_parameters(adapter.model)["total"] == meta["parameters"]["total"]
    # the first groups of the card's held-out set: a subset of what the card reports
    df = evaluate_organism(adapter=adapter, n_groups=8, seed=meta["eval"]["seed"])
    card_rows = {(r["subset"], r["relation"]): r for r in meta["eval"]["table"]}
    for subset in ("a", "b"):
        sub = df[df["subset"] == subset].set_index("relation")
        lr = sub.loc[["left", "right"]]
        assert (lr["accuracy"] * lr["n"]).sum() / lr["n"].sum() >= 0.8, subset
        assert sub.loc["all", "accuracy"] > 0.4, subset  # chance is 0.25
        ref = card_rows[(subset, "all")]
        assert abs(sub.loc["all", "accuracy"] - ref["accuracy"]) <= 0.2
        assert abs(sub.loc["all", "confidence"] - ref["confidence"]) <= 0.15


def test_organism_help_and_bad_path(capsys, tmp_path):
    from vislens.cli import main

    for argv, expect in ((["organism", "-h"], ("train", "eval")),
                         (["organism", "train", "--help"], ("--steps", "--small", "--out")),
                         (["organism", "eval", "-h"], ("--path", "--write-card"))):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: vislens {' '.join(a for a in argv if not a.startswith('-'))}")
        assert all(e in out for e in expect), out
    assert main(["organism", "eval", "--path", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err == f"vislens: error: {tmp_path / 'none'}: no model organism there (no config.json)\n"


@pytest.mark.skipif(not (DEFAULT_PATH / "organism.json").exists(), reason="no committed organism")
def test_model_card_template_reproduces_the_committed_card(tmp_path):
    """The card is templated from the package's model_card.md: from the committed numbers
    (training.json, organism.json) it writes the committed README.md byte for byte."""
    import os

    import pandas as pd

    from vislens.organism import write_model_card

    for f in DEFAULT_PATH.glob("*.safetensors"):  # the card states the weights' size
        os.symlink(f, tmp_path / f.name)
    stats = json.loads((DEFAULT_PATH / "training.json").read_text(encoding="utf-8"))
    meta = json.loads((DEFAULT_PATH / "organism.json").read_text(encoding="utf-8"))
    ev = meta["eval"]
    df = pd.DataFrame(ev["table"])
    df.attrs["box_attention_by_layer"] = ev["box_attention_by_layer"]
    df.attrs["box_ratio_by_layer"] = ev["box_ratio_by_layer"]
    info = {k: v for k, v in ev.items() if k not in ("table", "box_attention_by_layer", "box_ratio_by_layer")}
    card = write_model_card(tmp_path, stats, df, info, meta.get("scorecard"), meta.get("diagnosis"))
    assert card.read_text(encoding="utf-8") == (DEFAULT_PATH / "README.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "organism.json").read_text(encoding="utf-8")) == meta


def test_organism_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "vislens.organism", "eval", "--path", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == f"vislens: error: {tmp_path}: no model organism there (no config.json)\n"


def _finding(fid: str, verdict: str, value: float | None) -> dict:
    return {"id": fid, "claim": f"claim {fid}", "statistic": "s", "value": value,
            "ci_low": None if value is None else value - 0.1,
            "ci_high": None if value is None else value + 0.1, "n": 0 if value is None else 40,
            "verdict": verdict, "why": f"because {fid}"}


def test_card_reports_scorecard_and_control(small_run, tmp_path):
    """The card's scorecard section counts verdicts, lists every finding with its interval
    and the untrained control's; organism.json keeps them for the tests."""
    import shutil

    from vislens.organism import evaluate_organism, write_model_card

    path, stats = small_run
    dest = tmp_path / "org"
    shutil.copytree(path, dest)
    df = evaluate_organism(dest, n_groups=1, seed=11)
    sc = {"n_groups": 3, "seed": 99, "style": "distractors=1-2", "conditions": ["baseline", "vcd"],
          "findings": [_finding("F1", "reproduced", 0.5), _finding("F2", "not testable", None),
                       _finding("F3", "not reproduced", 0.45)],
          "control": [_finding("F1", "not reproduced", 1.2)], "control_seed": 3}
    text = write_model_card(dest, {**stats, "style": "distractors=1-2"}, df, {"n_groups": 1, "seed": 11}, sc).read_text()
    assert "**1 of 3 findings reproduced.**" in text and "**0 of 1 reproduced**" in text
    assert "| F1 | reproduced | 0.500 | [0.400, 0.600] | 40 | claim F1 |" in text
    assert "| F2 | not testable | — | — | 0 | claim F2 |" in text
    assert "- **F3** (not reproduced): because F3" in text
    assert "seed 99" in text and "`distractors=1-2`" in text and "--style distractors=1-2" in text
    assert json.loads((dest / "organism.json").read_text())["scorecard"] == sc
    plain = write_model_card(dest, stats, df, {"n_groups": 1, "seed": 11}).read_text()
    assert "Not measured for this checkpoint" in plain


def test_scorecard_conditions_parse_and_cover_the_findings():
    from vislens.decoding import check_conditions, parse_condition
    from vislens.organism.scorecard import SCORECARD_CONDITIONS

    conds = [parse_condition(c) for c in SCORECARD_CONDITIONS]
    check_conditions(conds)  # unique names
    methods = {c.method for c in conds}
    assert {"baseline", "scaling", "adaptvis", "add", "vcd", "dola"} <= methods
    alphas = [dict(c.params)["alpha"] for c in conds if c.method == "scaling"]
    assert min(alphas) < 1 < max(alphas)  # F8 needs smoothing and sharpening


def test_scorecard_runs_on_a_small_organism(small_run, tmp_path):
    pytest.importorskip("vislens.findings")
    from vislens.organism.scorecard import run_scorecard

    path, _ = small_run
    found = run_scorecard(path, tmp_path / "sc", n_groups=3, seed=77, style="distractors=1",
                          conditions=("baseline", "scaling:alpha=0.5", "scaling:alpha=2"),
                          n_boot=50, log=None)
    by_id = {f.id: f for f in found}
    assert set(by_id) >= {f"F{i}" for i in range(1, 11)}
    assert by_id["F9"].verdict == "not testable"  # no adaptvis condition captured
    # F6 counts left/right (12) and on/under (6) samples of the 2 x 12 scenes
    assert by_id["F6"].n == 18 and (tmp_path / "sc" / "findings" / "findings.json").exists()
    recs = [json.loads(x) for x in (tmp_path / "sc" / "scenes" / "controlled_a.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and all(len(r["meta"]["distractors"]) == 1 for r in recs)


def _card_scorecard() -> dict | None:
    meta_file = DEFAULT_PATH / "organism.json"
    return json.loads(meta_file.read_text()).get("scorecard") if meta_file.exists() else None


@pytest.mark.skipif(_card_scorecard() is None, reason="the committed card has no scorecard")
def test_committed_organism_scorecard_matches_card(tmp_path):
    """The first groups of the card's held-out scorecard set, baseline only: F1 (image share
    of attention), F6 (familiar minus rare confidence) and F7 (confidence AUROC for a right
    answer) agree with the card within sampling error (the card's interval widened for the
    smaller sample)."""
    pytest.importorskip("vislens.findings")
    from vislens.organism.scorecard import run_scorecard

    sc = _card_scorecard()
    n_groups = 6
    found = {f.id: f for f in run_scorecard(DEFAULT_PATH, tmp_path, n_groups=n_groups,
                                            seed=sc["seed"], style=sc["style"],
                                            conditions=("baseline",), n_boot=200, log=None)}
    card = {f["id"]: f for f in sc["findings"]}
    widen = (sc["n_groups"] / n_groups) ** 0.5
    for fid in ("F1", "F6", "F7"):
        ref = card[fid]
        half = (ref["ci_high"] - ref["ci_low"]) / 2
        assert found[fid].n == 8 * n_groups or fid == "F6"
        assert abs(found[fid].value - ref["value"]) <= 2 * widen * half + 1e-9, (fid, found[fid], ref)


def test_eval_scorecard_cli_writes_card_with_control(small_run, tmp_path, monkeypatch, capsys):
    """``organism eval --scorecard DIR --control --write-card``: both scorecards land in the
    card and organism.json; the control is the untrained init of the training seed."""
    pytest.importorskip("vislens.findings")
    import shutil

    from vislens.cli import main
    from vislens.organism import scorecard

    path, stats = small_run
    dest = tmp_path / "org"
    shutil.copytree(path, dest)
    monkeypatch.setattr(scorecard, "SCORECARD_CONDITIONS", ("baseline", "scaling:alpha=2"))
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--scorecard",
                 str(tmp_path / "sc"), "--scorecard-groups", "2", "--scorecard-seed", "5",
                 "--control", "--write-card"]) == 0
    meta = json.loads((dest / "organism.json").read_text())
    sc = meta["scorecard"]
    assert sc["conditions"] == ["baseline", "scaling:alpha=2"] and sc["n_groups"] == 2
    assert sc["control_seed"] == stats["seed"] and len(sc["control"]) == len(sc["findings"]) >= 10
    assert (tmp_path / "sc" / "control" / "findings" / "findings.json").exists()
    card = (dest / "README.md").read_text()
    assert "### Control: the same architecture with the init prior, untrained" in card
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--control"]) == 2
    assert "--control needs --scorecard" in capsys.readouterr().err


def test_familiar_weight_sets_the_skew_and_the_card_command():
    """``--familiar-weight W``: left/right W times as frequent as each rare relation in both
    subsets; the default is the documented 4:1, and the card's command repeats a non-default W."""
    from vislens.errors import VislensError
    from vislens.organism.card import _command
    from vislens.organism.config import relation_weights

    assert relation_weights() == RELATION_WEIGHTS
    w = relation_weights(1.5)
    assert w["a"] == {"left": 1.5, "right": 1.5, "on": 1.0, "under": 1.0}
    assert w["b"] == {"left": 1.5, "right": 1.5, "front": 1.0, "behind": 1.0}
    stats = {"seed": 0, "steps_planned": 10, "style": "lookalike=1", "relation_weights": w}
    assert _command(stats).endswith("--style lookalike=1 --familiar-weight 1.5")
    assert "--familiar-weight" not in _command({**stats, "relation_weights": RELATION_WEIGHTS})
    for bad in (0, -1, True, "2"):
        with pytest.raises(VislensError, match="familiar weight"):
            relation_weights(bad)


def test_diagnosis_conditions_cover_every_layer_at_the_scorecards_extremes():
    """One condition per (alpha, layer) and per wired head group, at the scorecard's
    strongest smoothing and sharpening (the alphas F8 reads)."""
    from vislens.decoding import check_conditions, parse_condition
    from vislens.organism.diagnosis import WIRED_HEADS, diagnosis_conditions
    from vislens.organism.scorecard import SCORECARD_CONDITIONS

    conds = [parse_condition(c) for c in diagnosis_conditions(4)]
    check_conditions(conds)
    sc_alphas = [dict(c.params)["alpha"] for c in map(parse_condition, SCORECARD_CONDITIONS)
                 if c.method == "scaling"]
    scaling = [c for c in conds if c.method == "scaling"]
    assert {dict(c.params)["alpha"] for c in scaling} == {min(sc_alphas), max(sc_alphas)}
    for a in (min(sc_alphas), max(sc_alphas)):
        mine = [c for c in scaling if dict(c.params)["alpha"] == a]
        assert sorted(c.layers for c in mine if c.heads is None and c.layers) == [(k,) for k in range(4)]
        assert any(c.layers is None and c.heads is None for c in mine)
        assert {(c.layers, c.heads) for c in mine if c.heads} == {
            ((layer,), heads) for layer, (heads, _) in WIRED_HEADS.items()}
    shared = {c.name for c in conds} & {parse_condition(c).name for c in SCORECARD_CONDITIONS}
    # the all-layer alphas are F8's own conditions; the restricted ones only live here
    assert shared == {"baseline"} | {c.name for c in scaling if c.layers is None}


def test_eval_diagnose_cli_writes_halves_and_card(small_run, tmp_path, capsys):
    """``organism eval --diagnose DIR --write-card``: per-half gains of every layer-restricted
    alpha, equal to a plain pandas computation on the captures; kept by a later --write-card."""
    pytest.importorskip("vislens.findings")
    import shutil

    import pandas as pd

    from vislens.cli import main
    from vislens.store import open_capture

    path, _ = small_run
    dest = tmp_path / "org"
    shutil.copytree(path, dest)
    dg = tmp_path / "dg"
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--diagnose", str(dg),
                 "--scorecard-groups", "3", "--scorecard-seed", "8", "--write-card"]) == 0
    halves = pd.read_csv(dg / "halves.csv")
    assert set(halves["condition"]) == {"scaling-0.5", "scaling-2", "scaling-0.5-L0", "scaling-0.5-L1",
                                        "scaling-2-L0", "scaling-2-L1", "scaling-0.5-L0-names",
                                        "scaling-0.5-L1-objects", "scaling-2-L0-names",
                                        "scaling-2-L1-objects"}
    parts = []
    for sub in "ab":
        with open_capture(dg / f"capture_{sub}.h5") as cap:
            t = cap.table()
        base = t[t.condition == "baseline"].set_index("row")
        x = t[t.condition == "scaling-2-L0"].set_index("row")
        low = base.confidence < base.confidence.median()
        parts.append(pd.DataFrame({"low": low, "d": x.correct.astype(float) - base.correct.astype(float)}))
    ref = pd.concat(parts)
    for half, sel in (("low", ref.low), ("high", ~ref.low)):
        row = halves[(halves.condition == "scaling-2-L0") & (halves.half == half)].iloc[0]
        assert row.n == sel.sum() and row.gain_pp == pytest.approx(100 * ref.d[sel].mean())
    head = pd.read_csv(dg / "headroom.csv").set_index("half")
    assert head["conditions"].eq(10).all() and head["n"].sum() == len(ref)
    assert (head["fixed_by_any"] <= head["baseline_errors"]).all()
    assert "fixed by some alpha > 1" in (dg / "halves.md").read_text()
    meta = json.loads((dest / "organism.json").read_text())
    assert meta["diagnosis"]["seed"] == 8 and len(meta["diagnosis"]["rows"]) == len(halves)
    card = (dest / "README.md").read_text()
    assert "## Where ScalingVis acts (diagnosis)" in card and "`scaling-2-L1-objects`" in card
    assert meta["diagnosis"]["headroom"] == json.loads(head.reset_index().to_json(orient="records"))
    assert "oracle accuracy" in card
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--write-card"]) == 0
    assert json.loads((dest / "organism.json").read_text())["diagnosis"] == meta["diagnosis"]
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--diagnose", str(dg),
                 "--scorecard", str(dg)]) == 2
    assert "name the same folder" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["organism", "eval", "--path", str(dest), "--n-groups", "1", "--diagnose",
                 str(foreign), "--scorecard-groups", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(foreign) in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_train_refuses_bad_n_groups_before_training(tmp_path, monkeypatch, capsys):
    """``train --n-groups 0`` is refused at once (naming the flag), not after a whole training
    run, and claims no output folder."""
    from vislens.cli import main
    from vislens.organism import cli as organism_cli

    trained = []
    monkeypatch.setattr(organism_cli, "train_organism", lambda *a, **k: trained.append(1))
    out = tmp_path / "o"
    for bad in ("0", "-3"):
        assert main(["organism", "train", "--out", str(out), "--small", "--n-groups", bad]) == 2
        assert capsys.readouterr().err == f"vislens: error: --n-groups {bad}: must be >= 1\n"
    assert not trained and not out.exists()


def test_training_scenes_of_any_count(tmp_path):
    """One scene in all (``--steps 1 --batch-size 1``) is subset A's; no empty subset B draw."""
    from vislens.organism.training import _training_scenes

    for n, want in ((1, {"a": 1}), (2, {"a": 1, "b": 1}), (5, {"a": 3, "b": 2})):
        scenes = _training_scenes(n, 0, RELATION_WEIGHTS, 32)
        got = {s: sum(x.sample.meta["subset"] == s for x in scenes) for s in ("a", "b")}
        assert {k: v for k, v in got.items() if v} == want


def test_card_command_parses_back_to_the_run():
    """The card's reproduce command, parsed by the CLI's own parser, names the run's options
    (``--small`` included: without it the command would train the full-size organism)."""
    import argparse
    import shlex

    from vislens.organism.card import _command
    from vislens.organism.cli import add_arguments
    from vislens.organism.config import relation_weights

    parser = add_arguments(argparse.ArgumentParser())
    for stats in ({"seed": 3, "steps_planned": 20, "batch_size": 4, "lr": 3e-3, "small": True,
                   "style": "plain", "relation_weights": relation_weights()},
                  {"seed": 0, "steps_planned": 1100, "batch_size": 16, "lr": 1e-3, "small": False,
                   "style": "lookalike=1", "relation_weights": relation_weights(1.5)}):
        args = parser.parse_args(shlex.split(_command(stats))[2:])
        assert (args.seed, args.steps, args.batch_size, args.lr, args.small, args.style) == (
            stats["seed"], stats["steps_planned"], stats["batch_size"], stats["lr"],
            stats["small"], stats["style"])
        assert relation_weights(args.familiar_weight) == stats["relation_weights"]


def test_card_command_of_a_run_stopped_by_its_time_limit():
    """A ``--minutes`` run stopped before its planned steps: the card's command says that it
    trains all planned steps while the checkpoint had only the steps it ran."""
    from vislens.organism.card import _command

    stats = {"seed": 0, "steps": 7, "steps_planned": 400, "stopped_early": "time limit of 1 min "
             "reached after 7 steps"}
    cmd = _command(stats)
    assert cmd.startswith("vislens organism train --out data/organism --seed 0 --steps 400")
    assert "stopped after 7 of 400 steps" in cmd.splitlines()[-1]
    assert _command({**stats, "steps": 400, "stopped_early": None}).count("\n") == 0
