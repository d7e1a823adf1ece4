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


def _tree(root):
    """Every path under ``root`` with its file content (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


FAILING = [  # each fails after claiming its output folder, before writing into it
    ["findings", "missing.h5", "--out", "{out}"],
    ["figures", "missing.h5", "--out", "{out}"],
    ["report", "missing.h5", "--out", "{out}"],
    ["evaluate", "missing.h5", "--out", "{out}"],
    ["synth", "--n", "4", "--style", "warp=1", "--out", "{out}"],
]


@pytest.mark.parametrize("argv", FAILING)
def test_a_failed_command_leaves_no_new_output_folder(tmp_path, capsys, argv):
    out = tmp_path / "new" / "deeper" / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the parents it made


@pytest.mark.parametrize("argv", FAILING)
def test_a_failed_command_leaves_an_existing_folder_as_it_was(tmp_path, capsys, argv):
    empty, marked, foreign = tmp_path / "empty", tmp_path / "marked", tmp_path / "foreign"
    for d in (empty, marked, foreign):
        d.mkdir()
    (marked / MARKER).touch()
    (marked / "old.csv").write_text("an earlier run's output")
    (foreign / "notes.txt").write_text("a researcher's file")
    before = _tree(tmp_path)
    for out, extra in ((empty, []), (marked, []), (foreign, ["--force"])):
        assert main([a.format(out=out) for a in argv] + extra) == 2
    assert _tree(tmp_path) == before


def test_figures_main_also_leaves_no_new_folder(tmp_path, capsys):
    from vislens import figures

    assert figures.main(["missing.h5", "--out", str(tmp_path / "figs")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_folder_written_into_is_kept_after_a_failure(tmp_path):
    from vislens.io import prepare_output_dir, unclaim_on_failure

    kept, empty = tmp_path / "kept", tmp_path / "a" / "empty"
    with pytest.raises(RuntimeError):
        with unclaim_on_failure():
            prepare_output_dir(kept)
            prepare_output_dir(empty)
            (kept / "partial.csv").write_text("written before the failure")
            raise RuntimeError("boom")
    assert (kept / "partial.csv").exists() and (kept / MARKER).exists()
    assert not (tmp_path / "a").exists()
    with unclaim_on_failure():  # success keeps everything
        prepare_output_dir(empty)
    assert sorted(p.name for p in empty.iterdir()) == [MARKER]
