"""``vislens phrase-stats``: the paper's relation-phrase rules on a small LLaVA-format file."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from vislens.errors import VislensError
from vislens.phrases import count_phrases, phrase_stats, read_conversations

# a LLaVA-format fixture: every relation's rules, with the expected count beside each text
RECORDS = [
    {"id": "0", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the left side of the table?"},
        {"from": "gpt", "value": "A cat sits on the left side of the table, to the right of a lamp."}]},
    {"id": "1", "image": "b.jpg", "conversations": [
        {"from": "human", "value": "Where is the cup?"},
        {"from": "gpt", "value": "The cup is on top of the shelf, above the sink and under a "
                                 "lamp; the bag is in front of the door, behind a chair."}]},
    {"id": "2", "conversations": [
        {"from": "human", "value": "Is the dog left of the car?"},
        {"from": "gpt", "value": "Yes, it is to the left. The leftover food is on the floor below it."}]},
]
# by hand: left: "on the left side" (rec 0, human) + "on the left side" (gpt) + "left of" +
#   "to the left" (rec 2) = 4 ("leftover" is no word match); right: "to the right of" = 1;
# on: rec 0 none (both "on the left"), rec 1 "on top of" (once) + "above" = 2, rec 2 "on the
#   floor" = 1 -> 3; under: "under" + "below" = 2; front: 1; behind: 1
EXPECTED = {"left": 4, "right": 1, "on": 3, "under": 2, "front": 1, "behind": 1}
RECORDS_WITH = {"left": 2, "right": 1, "on": 2, "under": 2, "front": 1, "behind": 1}


@pytest.fixture
def conv_file(tmp_path):
    p = tmp_path / "llava.json"
    p.write_text(json.dumps(RECORDS))
    return p


def test_rules_hand_cases():
    assert count_phrases("on the left side of")["left"] == 1  # one word, several rules
    assert count_phrases("on the left")["on"] == 0
    assert count_phrases("a book on the desk")["on"] == 1
    assert count_phrases("on top of the desk")["on"] == 1  # "on top" once
    assert count_phrases("the top shelf")["on"] == 1
    assert count_phrases("turn left now")["left"] == 0  # not one of the phrases
    assert count_phrases("Left of the box")["left"] == 1  # case-insensitive
    assert count_phrases("in front of; in-front")["front"] == 1
    assert count_phrases("beneath the bottom")["under"] == 2


def test_phrase_stats_on_fixture(conv_file):
    texts = read_conversations(conv_file)
    df = phrase_stats(texts)
    assert list(df.index) == ["left", "right", "on", "under", "front", "behind"]
    assert df["occurrences"].to_dict() == EXPECTED
    assert df["records"].to_dict() == RECORDS_WITH
    assert df["percent"].sum() == pytest.approx(100.0)
    gpt = phrase_stats(read_conversations(conv_file, ["gpt"]))
    assert gpt.loc["left", "occurrences"] == 2  # rec 0 gpt + rec 2 "to the left"


def test_cli(conv_file, tmp_path, capsys):
    from vislens.cli import main

    out = tmp_path / "phr.csv"
    assert main(["phrase-stats", str(conv_file), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 conversation record(s)" in text and "| left | 4 | 2 |" in text
    assert pd.read_csv(out, index_col=0)["occurrences"].to_dict() == EXPECTED


@pytest.mark.parametrize("content, words", [
    ("{not json", "not a JSON file"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"id": 1}]', "record 0 has no 'conversations'"),
    ('[{"conversations": [{"from": "gpt"}]}]', "record 0 turn 0"),
])
def test_bad_files_one_line_errors(tmp_path, content, words, capsys):
    from vislens.cli import main

    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(VislensError, match=words):
        read_conversations(p)
    assert main(["phrase-stats", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vislens: error:") and "bad.json" in err and err.count("\n") == 1
    assert main(["phrase-stats", str(tmp_path / "missing.json")]) == 2
