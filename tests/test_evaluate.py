"""vislens.evaluate: matcher truth tables, pair/set accuracy, VSR scores, tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from vislens import evaluate
from vislens.errors import VislensError


# --------------------------------------------------------------------------- matchers


@pytest.mark.parametrize(
    ("generation", "gold", "paper", "first_word"),
    [
        ("Left", "Left", True, True),
        ("left.", "Left", True, True),
        ("  Left of the table", "Left", True, True),
        ("Right", "Left", False, False),
        ("bright", "Right", True, False),  # substring quirk of the paper rule
        ("one", "On", True, False),
        ("On", "On", True, True),
        ("on top of", "On", True, True),
        ("on top of", "Top", True, False),
        ("in front", "On", False, False),  # "front" never means On in the paper rule
        ("In front of the chair", "Front", True, True),
        ("front", "Front", True, True),
        ("Front", "in front of", False, True),
        ("The answer is Left", "Left", True, False),
        ("Under", "Under", True, True),
        ("", "Left", False, False),
        ("Behind", "Front", False, False),
    ],
)
def test_matcher_truth_table(generation: str, gold: str, paper: bool, first_word: bool) -> None:
    assert evaluate.match_paper(generation, gold) is paper
    assert evaluate.match_first_word(generation, gold) is first_word


def test_match_first_word_rejects_wordless_gold() -> None:
    with pytest.raises(VislensError):
        evaluate.match_first_word("Left", "42")


@pytest.mark.parametrize(
    ("generation", "label", "expected"),
    [
        ("Yes", 1, True),
        ("yes", 1, False),  # case-sensitive
        ("Yes, it is.", 1, True),
        ("No", 1, False),
        ("No", 0, True),
        ("no", 0, False),
        ("None of them", 0, True),  # substring quirk
        ("Yes", 0, False),
        ("Yes and No", 0, True),
        ("Yes and No", 1, True),
    ],
)
def test_match_vsr_paper(generation: str, label: int, expected: bool) -> None:
    assert evaluate.match_vsr_paper(generation, label) is expected


def test_match_vsr_paper_rejects_bad_label() -> None:
    with pytest.raises(VislensError):
        evaluate.match_vsr_paper("Yes", 2)


# --------------------------------------------------------------------------- accuracy


def test_accuracy() -> None:
    assert evaluate.accuracy([True, False, True, True]) == pytest.approx(0.75)
    assert evaluate.accuracy(np.array([1, 0])) == pytest.approx(0.5)
    assert math.isnan(evaluate.accuracy([]))


def _two_groups() -> tuple[list[str], list[str], list[bool]]:
    # group g1 complete: left/right both right, on/under one wrong -> 1 pair of 2, set wrong
    # group g2 incomplete: left/right both right, "on" only (no under) -> 1 complete pair
    relations = ["left", "right", "on", "under", "Left of", "right", "on"]
    groups = ["g1", "g1", "g1", "g1", "g2", "g2", "g2"]
    correct = [True, True, True, False, True, True, True]
    return relations, groups, correct


def test_pair_set_accuracy_complete_denominators() -> None:
    res = evaluate.pair_set_accuracy(*_two_groups(), subset="a")
    assert res["pair_correct"] == 2 and res["n_pairs"] == 3
    assert res["set_correct"] == 0 and res["n_sets"] == 1
    assert res["pair_acc"] == pytest.approx(100 * 2 / 3)
    assert res["set_acc"] == pytest.approx(0.0)


def test_pair_set_accuracy_paper_denominators() -> None:
    res = evaluate.pair_set_accuracy(*_two_groups(), subset="a", paper_denominators=True)
    assert res["n_pairs"] == pytest.approx(7 / 2) and res["n_sets"] == pytest.approx(7 / 4)
    assert res["pair_acc"] == pytest.approx(100 * 2 / 3.5)
    assert res["set_acc"] == pytest.approx(0.0)


def test_pair_set_accuracy_all_correct_subset_b_and_equal_denominators() -> None:
    relations = ["left", "right", "in front of", "behind"] * 2
    groups = ["g1"] * 4 + ["g2"] * 4
    correct = [True] * 4 + [True, True, False, True]
    for paper in (False, True):
        res = evaluate.pair_set_accuracy(relations, groups, correct, "b", paper_denominators=paper)
        assert res["pair_acc"] == pytest.approx(75.0)  # 3 of 4 pairs
        assert res["set_acc"] == pytest.approx(50.0)  # 1 of 2 sets


def test_pair_set_accuracy_rejects_bad_input() -> None:
    with pytest.raises(VislensError):  # "front" is not in subset a
        evaluate.pair_set_accuracy(["left", "front"], ["g", "g"], [True, True], "a")
    with pytest.raises(VislensError):  # duplicate relation in a group
        evaluate.pair_set_accuracy(["left", "left"], ["g", "g"], [True, True], "a")
    with pytest.raises(VislensError):
        evaluate.pair_set_accuracy(["left"], ["g", "g"], [True, True], "a")
    res = evaluate.pair_set_accuracy(["left"], ["g"], [True], "a")
    assert math.isnan(res["pair_acc"]) and math.isnan(res["set_acc"])


# --------------------------------------------------------------------------- VSR


def test_vsr_scores_hand_check() -> None:
    label = np.array([1] * 100 + [0] * 100)
    pred = np.array([True] * 60 + [False] * 40 + [False] * 80 + [True] * 20)  # TP60 FN40 TN80 FP20
    s = evaluate.vsr_scores(pred, label)
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (60, 40, 80, 20)
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["precision"] == pytest.approx(0.75) == precision_score(label, pred)
    assert s["recall"] == pytest.approx(0.6) == recall_score(label, pred)
    assert s["f1"] == pytest.approx(f1_score(label, pred))
    assert round(s["f1"], 3) == 0.667
    assert s["precision_paper"] == pytest.approx(0.6)
    assert s["recall_paper"] == pytest.approx(0.8)
    assert round(s["f1_paper"], 3) == 0.686


def test_vsr_scores_undefined_precision_is_nan() -> None:
    s = evaluate.vsr_scores(np.array([False, False]), np.array([1, 0]))
    assert math.isnan(s["precision"])
    assert s["recall"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- tables


def _tidy() -> pd.DataFrame:
    relations, groups, correct = _two_groups()
    base = pd.DataFrame({"relation": relations, "group": groups, "correct": correct})
    base["relation"] = base["relation"].replace({"Left of": "left"})
    steered = base.assign(correct=True)
    return pd.concat(
        [base.assign(condition="baseline"), steered.assign(condition="scalingvis")], ignore_index=True
    )


def test_accuracy_table_per_condition_and_relation() -> None:
    table = evaluate.accuracy_table(_tidy(), by=["condition"], pair_set="a")
    assert table.index.tolist() == ["baseline", "scalingvis"]
    assert table.columns.tolist() == ["n", "left", "right", "on", "under", "acc", "pair_acc", "set_acc"]
    base = table.loc["baseline"]
    assert base["n"] == 7
    assert base["left"] == pytest.approx(100.0) and base["under"] == pytest.approx(0.0)
    assert base["acc"] == pytest.approx(100 * 6 / 7)
    assert base["pair_acc"] == pytest.approx(100 * 2 / 3)
    assert table.loc["scalingvis", "set_acc"] == pytest.approx(100.0)


def test_accuracy_table_missing_column() -> None:
    with pytest.raises(VislensError):
        evaluate.accuracy_table(_tidy().drop(columns="group"), pair_set="a")
    table = evaluate.accuracy_table(_tidy(), by="condition", columns=None)
    assert table.columns.tolist() == ["n", "acc"]


def test_to_markdown_without_tabulate() -> None:
    df = pd.DataFrame({"condition": ["base", "a|b"], "acc": [66.666, float("nan")], "n": [7, 3]})
    md = evaluate.to_markdown(df)
    assert md.splitlines() == [
        "| condition | acc | n |",
        "|:---|---:|---:|",
        "| base | 66.7 | 7 |",
        "| a\\|b | nan | 3 |",
    ]
    table = evaluate.accuracy_table(_tidy(), columns=None)
    lines = evaluate.to_markdown(table, floatfmt=".2f").splitlines()
    assert lines[0] == "| condition | n | acc |"
    assert lines[2] == "| baseline | 7 | 85.71 |"


def test_accuracy_table_wilson_intervals_and_markdown() -> None:
    from scipy.stats import binomtest

    table = evaluate.accuracy_table(_tidy(), by=["condition"], pair_set="a", intervals=True)
    assert table.columns.tolist()[:4] == ["n", "left", "left_low", "left_high"]
    assert table.columns.tolist()[-3:] == ["set_acc", "set_acc_low", "set_acc_high"]
    base = table.loc["baseline"]
    ci = binomtest(6, 7).proportion_ci(0.95, method="wilson")  # 6 of 7 correct
    assert base["acc_low"] == pytest.approx(100 * ci.low) and base["acc_high"] == pytest.approx(100 * ci.high)
    ci = binomtest(2, 3).proportion_ci(0.95, method="wilson")  # 2 of 3 pairs
    assert base["pair_acc_low"] == pytest.approx(100 * ci.low)
    assert base["acc_low"] < base["acc"] < base["acc_high"]
    lines = evaluate.to_markdown(table[["n", "acc", "acc_low", "acc_high"]]).splitlines()
    assert lines[0] == "| condition | n | acc |"
    assert lines[1] == "|:---|---:|---:|"  # the interval column stays right-aligned
    assert lines[2] == f"| baseline | 7 | 85.7 [{100 * ci_low(6, 7):.1f}, {100 * ci_high(6, 7):.1f}] |"


def ci_low(k, n):
    from scipy.stats import binomtest

    return binomtest(k, n).proportion_ci(0.95, method="wilson").low


def ci_high(k, n):
    from scipy.stats import binomtest

    return binomtest(k, n).proportion_ci(0.95, method="wilson").high


def test_gold_frequency_is_table7() -> None:
    df = pd.DataFrame({"relation": ["left", "left", "left", "on", "on"],
                       "answer": ["Yes", "Yes", "No", "Yes", "No"]})
    t = evaluate.gold_frequency(df)
    assert t.index.tolist() == [("left", "Yes"), ("left", "No"), ("on", "Yes"), ("on", "No")]
    assert t["n"].tolist() == [2, 1, 1, 1]
    assert t.loc[("left", "Yes"), "percent"] == pytest.approx(40.0)
    assert t.loc[("left", "Yes"), "percent_of_relation"] == pytest.approx(200 / 3)
    assert t["percent"].sum() == pytest.approx(100.0)
    with pytest.raises(VislensError, match="answer"):
        evaluate.gold_frequency(df.drop(columns="answer"))


def test_yes_no_detection_is_one_rule_for_capture_evaluate_and_sweep():
    """One definition of VSR-style data: every value yes or no, any case (issue 12 item 6)."""
    from vislens import capture, sweep
    from vislens.data.base import Sample
    from vislens.evaluate import is_yes_no

    assert is_yes_no(["Yes", "no", " YES "]) and not is_yes_no([]) and not is_yes_no(["Yes", "Left"])
    assert sweep.is_yes_no is is_yes_no
    vsr = Sample(id="v", image_path="", question="Is the cat left of the dog?", options=["No", "Yes"],
                 answer="Yes")
    # the paper's VSR rule is case-sensitive "Yes" anywhere; the substring rule would say the same
    # for "yes", so a lower-case answer tells the two apart
    assert capture.is_correct("Yes, it is.", vsr) and not capture.is_correct("yes", vsr)


def test_vsr_table_counts_an_answer_that_is_neither_yes_nor_no_as_wrong(tmp_path):
    """VSR scores of a capture use the same correctness as its accuracy table: an answer that
    is neither yes nor no is a miss for a true caption (FN) and a false alarm for a false one
    (FP), as the paper's code counts it (label 0 is TN only when 'No' is in the answer)."""
    import h5py
    from test_plots import make_capture

    path = make_capture(tmp_path / "vsr.h5", n=8, conditions=("baseline",), with_boxes=False)
    answers = ["Yes"] * 4 + ["No"] * 4
    preds = ["Yes", "No", "Maybe", "Yes.", "No", "Maybe", "Yes", "None"]
    with h5py.File(path, "r+") as f:
        f["samples/answer"][...] = answers
        f["samples/options"][...] = [["Yes", "No", "Yes", "No"]] * 8
        f["conditions/baseline/prediction"][...] = preds
    tables = evaluate.evaluate_capture(path, log=None)
    y = np.array([a == "Yes" for a in answers])
    # hand-read decisions: which answers say "yes" under each rule (non-answers as wrong)
    said_yes = {"paper": [1, 0, 0, 1, 0, 1, 1, 0], "first-word": [1, 0, 0, 1, 0, 1, 1, 1]}
    acc = tables["accuracy"]
    for matcher, pred in said_yes.items():
        row = tables["vsr"].set_index("matcher").loc[matcher]
        pred = np.array(pred, bool)
        assert (row.tp, row.fn, row.tn, row.fp) == (
            (pred & y).sum(), (~pred & y).sum(), (~pred & ~y).sum(), (pred & ~y).sum())
        assert row.f1 == pytest.approx(f1_score(y, pred))
        assert row.precision == pytest.approx(precision_score(y, pred))
        assert 100 * row.accuracy == pytest.approx(acc[acc["matcher"] == matcher]["acc"].iloc[0])


def test_evaluate_csvs_carry_no_unnamed_row_number_column(tmp_path):
    """The CSVs vislens evaluate writes start with a named column (a table's meaningful
    index, e.g. ``condition``), never pandas' unnamed 0, 1, ... row numbers (vsr.csv did)."""
    import h5py
    from test_plots import make_capture

    path = make_capture(tmp_path / "vsr.h5", n=8, conditions=("baseline",), with_boxes=False)
    with h5py.File(path, "r+") as f:
        f["samples/answer"][...] = ["Yes"] * 4 + ["No"] * 4
        f["samples/options"][...] = [["Yes", "No", "Yes", "No"]] * 8
        f["conditions/baseline/prediction"][...] = ["Yes", "No"] * 4
    tables = evaluate.evaluate_capture(path, log=None, out_dir=tmp_path / "eval")
    assert "vsr" in tables
    for name in tables:
        header = (tmp_path / "eval" / f"{name}.csv").read_text().splitlines()[0].split(",")
        assert header[0] and not header[0].startswith("Unnamed"), (name, header)
    vsr = pd.read_csv(tmp_path / "eval" / "vsr.csv")
    assert list(vsr.columns[:2]) == ["matcher", "condition"]
    assert list(vsr["tp"]) == [int(r.tp) for r in tables["vsr"].itertuples()]
