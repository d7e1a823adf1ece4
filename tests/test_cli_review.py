"""Black-box review of the command line: realistic mistakes end in one line
(``vislens: error: ...``, exit status 2) naming the file or flag, nothing already written
is touched, and no option is accepted and then ignored."""
from __future__ import annotations

import json

import pytest

from vislens.cli import main


def _one_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines()
             if "it/s]" not in ln]  # progress bars (building/loading the tiny model)
    err = "\n".join(lines)
    assert len(lines) == 1 and err.startswith("vislens: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A small synthetic dataset (8 scenes of subset a) and its JSONL path."""
    out = tmp_path_factory.mktemp("scenes") / "syn"
    assert main(["synth", "--n", "8", "--subsets", "a", "--out", str(out)]) == 0
    return out / "controlled_a.jsonl"


@pytest.fixture(scope="module")
def capture_file(tiny_dir, scenes, tmp_path_factory):
    """A complete baseline capture of the scenes by the tiny LLaVA."""
    out = tmp_path_factory.mktemp("cap") / "run.h5"
    assert main(["capture", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def _capture(tiny_dir, scenes, out, *extra: str) -> int:
    return main(["capture", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
                 "--out", str(out), "--device", "cpu", "--quiet", *extra])


def test_value_flag_given_twice_with_different_values_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(SystemExit) as exc:  # argparse: usage line and the error
        main(["evaluate", "missing.h5", "--out", str(a), "--out", str(b)])
    assert exc.value.code == 2
    assert "argument --out: given twice" in capsys.readouterr().err
    assert not a.exists() and not b.exists()
    with pytest.raises(SystemExit):
        main(["organism", "eval", "--n-groups", "1", "--n-groups", "0"])
    assert "argument --n-groups: given twice" in capsys.readouterr().err
    # the same value twice is harmless and accepted (a missing file is the next error)
    assert main(["evaluate", "missing.h5", "--out", str(a), "--out", str(a)]) == 2
    assert "missing.h5: no such capture file" in _one_line(capsys)


def test_abbreviated_option_names_are_refused(tmp_path, capsys):
    """argparse would take ``--split`` for ``--split-seed``: a prefix is an error, not a guess."""
    from vislens import figures, sweep

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--model", "x", "--dataset", "jsonl:y", "--out", str(tmp_path / "s"),
              "--split", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["organism", "eval", "--n-group", "2"])
    assert "--n-group" in capsys.readouterr().err
    for entry, argv in ((sweep.main, ["--model", "x", "--dataset", "jsonl:y", "--out", "o",
                                      "--split", "3"]),
                        (figures.main, ["a.h5", "--ou", str(tmp_path / "f")])):
        with pytest.raises(SystemExit):
            entry(argv)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_empty_split_is_one_line(tiny_dir, tmp_path, capsys):
    line = json.dumps({"id": "only", "image": "", "question": "Where? Answer with left or right.",
                       "options": ["Left", "Right"], "answer": "Left"})
    data = tmp_path / "one.jsonl"
    data.write_text(line + "\n")
    assert _capture(tiny_dir, data, tmp_path / "o.h5", "--split", "val") == 2
    err = _one_line(capsys)
    assert "val split" in err and "empty" in err and str(data) in err
    assert not (tmp_path / "o.h5").exists()


def test_data_root_with_a_jsonl_dataset_is_refused(tiny_dir, scenes, tmp_path, capsys):
    assert _capture(tiny_dir, scenes, tmp_path / "o.h5", "--data-root", str(tmp_path)) == 2
    assert "--data-root" in _one_line(capsys)
    assert not (tmp_path / "o.h5").exists()


def test_unavailable_cuda_device_is_one_line(tiny_dir, scenes, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "o.h5"
    assert main(["capture", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
                 "--out", str(out), "--device", "cuda", "--quiet"]) == 2
    assert "--device cuda: no CUDA device" in _one_line(capsys)


def test_a_condition_named_after_another_method_is_refused(tiny_dir, scenes, tmp_path, capsys):
    # analyses find the reference condition by the name 'baseline'
    assert _capture(tiny_dir, scenes, tmp_path / "o.h5", "--condition",
                    "scaling:alpha=2,name=baseline") == 2
    assert "condition name 'baseline'" in _one_line(capsys)
    assert not (tmp_path / "o.h5").exists()


def test_corrupted_capture_structure_is_one_line(capture_file, tmp_path, capsys):
    data = bytearray(capture_file.read_bytes())
    at = data.index(b"SNOD")  # a group's symbol-table node: the file's structure, not a chunk
    data[at:at + 4] = b"XXXX"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(data))
    for argv in (["evaluate", str(bad), "--out", str(tmp_path / "ev")],
                 ["report", str(bad), "--out", str(tmp_path / "rep")],
                 ["boxes", str(bad)]):
        assert main(argv) == 2
        err = _one_line(capsys)
        assert str(bad) in err and "corrupted" in err
    assert bad.read_bytes() == bytes(data)


def test_boxes_refuses_detector_options_without_a_detector(capture_file, capsys):
    before = capture_file.read_bytes()
    for flag, value in (("--conf", "0.5"), ("--weights", "yolov8x.pt"), ("--batch-size", "4"),
                        ("--device", "cpu"), ("--on-error", "stop")):
        assert main(["boxes", str(capture_file), flag, value]) == 2
        assert f"{flag} applies to --detector yolo only" in _one_line(capsys)
    assert capture_file.read_bytes() == before


def test_findings_refuses_a_capture_given_twice(capture_file, tmp_path, capsys):
    # pooled twice, every sample would count double and the intervals shrink
    same = capture_file.parent / "." / capture_file.name
    assert main(["findings", str(capture_file), str(same), "--out", str(tmp_path / "f"),
                 "--n-boot", "20"]) == 2
    assert "given twice" in _one_line(capsys)


def test_report_refuses_a_condition_listed_twice(capture_file, tmp_path, capsys):
    assert main(["report", str(capture_file), "--out", str(tmp_path / "r"),
                 "--conditions", "baseline,baseline"]) == 2
    assert "'baseline' is listed twice" in _one_line(capsys)


def test_phrase_stats_bad_paths_and_force_without_out(tmp_path, capsys):
    conv = tmp_path / "conv.json"
    conv.write_text('[{"conversations": [{"from": "gpt", "value": "It is left of the cup."}]}]')
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["phrase-stats", str(folder)]) == 2
    assert f"{folder}: is a folder" in _one_line(capsys)
    assert main(["phrase-stats", str(conv), "--out", str(folder), "--force"]) == 2
    assert f"{folder} is a folder" in _one_line(capsys)
    assert folder.is_dir() and not any(folder.iterdir())
    assert main(["phrase-stats", str(conv), "--force"]) == 2
    assert "--force needs --out" in _one_line(capsys)


def test_synth_style_key_given_twice_is_refused(tmp_path, capsys):
    assert main(["synth", "--n", "4", "--out", str(tmp_path / "s"),
                 "--style", "texture=2,texture=3"]) == 2
    assert "texture given twice" in _one_line(capsys)


def test_organism_eval_refuses_scene_options_without_scorecard(capsys):
    for argv in (["--style", "plain"], ["--scorecard-groups", "3"], ["--scorecard-seed", "1"]):
        assert main(["organism", "eval", "--n-groups", "1", *argv]) == 2
        assert f"{argv[0]} needs --scorecard DIR or --diagnose DIR" in _one_line(capsys)


def test_organism_write_card_without_training_stats_is_one_line(tiny_dir, capsys):
    path = tiny_dir("llava")  # a model directory, but no training.json
    assert main(["organism", "eval", "--n-groups", "1", "--write-card", "--path", str(path)]) == 2
    assert "training.json: not found" in _one_line(capsys)


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--lr", "nan"), ("--minutes", "0")])
def test_organism_train_checks_numbers_first(tmp_path, capsys, flag, value):
    out = tmp_path / "org"
    assert main(["organism", "train", "--small", "--steps", "1", "--out", str(out),
                 flag, value]) == 2
    assert f"{flag} {value}: must be a positive number" in _one_line(capsys)
