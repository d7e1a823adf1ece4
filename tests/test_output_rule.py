"""Every command that writes a folder refuses one it did not create (issue 11, item 2)."""
from __future__ import annotations

import pytest

from vislens.cli import main
from vislens.io import MARKER


@pytest.mark.parametrize("argv", [
    ["synth", "--n", "4", "--out", "{out}"],
    ["demo", "--groups", "1", "--out", "{out}"],
    ["findings", "missing.h5", "--out", "{out}"],
    ["figures", "missing.h5", "--out", "{out}"],
    ["organism", "train", "--small", "--steps", "1", "--out", "{out}"],
])
def test_folder_commands_refuse_a_foreign_folder(tmp_path, capsys, argv):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a researcher's file")
    rc = main([a.format(out=out) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(out) in err and "--force" in err
    assert (out / "notes.txt").read_text() == "a researcher's file"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_synth_writes_a_marked_folder_and_rewrites_it(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["synth", "--n", "4", "--subsets", "a", "--out", str(out)]) == 0
    assert (out / MARKER).exists() and (out / "controlled_a.jsonl").exists()
    first = (out / "controlled_a.jsonl").read_text()
    assert main(["synth", "--n", "4", "--subsets", "a", "--out", str(out)]) == 0  # its own folder
    assert (out / "controlled_a.jsonl").read_text() == first


def test_synth_force_writes_into_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert main(["synth", "--n", "4", "--subsets", "a", "--out", str(out), "--force"]) == 0
    assert (out / "controlled_a.jsonl").exists() and (out / "notes.txt").read_text() == "kept"


def test_phrase_stats_refuses_to_replace_a_file(tmp_path, capsys):
    conv = tmp_path / "conv.json"
    conv.write_text('[{"conversations": [{"from": "gpt", "value": "It is on the left of the cup."}]}]')
    target = tmp_path / "counts.csv"
    target.write_text("keep me")
    assert main(["phrase-stats", str(conv), "--out", str(target)]) == 2
    assert "--force" in capsys.readouterr().err and target.read_text() == "keep me"
    assert main(["phrase-stats", str(conv), "--out", str(target), "--force"]) == 0
    assert target.read_text() != "keep me"
