"""The capture job end to end on a tiny model: contents, resume after SIGKILL, shards, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from vislens.capture import run_capture
from vislens.errors import VislensError
from vislens.store import CaptureWriter, open_capture

CONDS = ["baseline", "scaling:alpha=0.5", "adaptvis:alpha1=0.5,alpha2=2,beta=0.5"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vislens.synth import generate_groups, write_scenes

    out = tmp_path_factory.mktemp("scenes")
    return write_scenes(generate_groups(2, "a", seed=3), out, name="a.jsonl")


def cap(tiny_dir, scenes, out, **kw):
    args = dict(model=str(tiny_dir("llava")), dataset=f"jsonl:{scenes}", out=out, conditions=CONDS,
                batch_size=3, max_new_tokens=3, device="cpu", progress=False, log=lambda m: None)
    args.update(kw)
    return run_capture(**args)


def test_capture_contents_match_the_engine(tiny_dir, tiny_adapter, scenes, tmp_path):
    from PIL import Image

    from vislens.data import load_jsonl
    from vislens.decoding import run_conditions
    from vislens.evaluate import match_paper

    summary = cap(tiny_dir, scenes, tmp_path / "c.h5")
    assert summary.complete and summary.n_written == 8
    samples = load_jsonl(scenes)
    # same batches as the capture (batch_size=3): a random tiny model has near-ties that
    # another batch shape's rounding could flip (a different token, or AdaptVis's alpha)
    ref = []
    for b in range(0, len(samples), 3):
        part = samples[b:b + 3]
        ref += run_conditions(tiny_adapter("llava"), [Image.open(s.image_path).convert("RGB") for s in part],
                              [s.question for s in part], [s.options for s in part], CONDS,
                              max_new_tokens=3)
    with open_capture(summary.path) as c:
        assert c.attrs["format"] == "vislens-capture" and c.attrs["complete"]
        assert list(c.conditions) == ["baseline", "scaling-0.5", "adaptvis"]
        assert list(c.samples["id"]) == [s.id for s in samples]
        assert (c.samples["n_image_tokens"] == 576).all() and (c.samples["n_text_tokens"] > 10).all()
        tab = c.table()
        assert len(tab) == 8 * 3
        for name in c.conditions:
            attn = c.attention(name)
            im, tm = c.masses(name)
            for i, r in enumerate(ref):
                np.testing.assert_allclose(attn[i], r[name].image_attention, atol=2e-3)
                np.testing.assert_allclose(im[i], r[name].image_mass, atol=1e-5)
            lmean, lmax = c.image_logits(name)  # format 2: the answer row's image logits
            np.testing.assert_allclose(lmean, [r[name].image_logit_mean for r in ref],
                                       rtol=1e-4, atol=1e-4 * np.abs(lmax).max())
            assert (c.compute_seconds(name) > 0).all()
            t = tab[tab["condition"] == name].sort_values("row")
            assert list(t["prediction"]) == [r[name].text for r in ref]
            assert list(t["correct"]) == [match_paper(r[name].text, s.answer) for r, s in zip(ref, samples)]
            np.testing.assert_allclose(t["alpha_used"], [r[name].alpha_used for r in ref])
        # annotation boxes -> masks: each mask covers the two objects' boxes
        mask = c.box_mask()
        assert mask.shape == (8, 24, 24)
        for m, s in zip(mask, samples):
            area = sum((b.xyxy[2] - b.xyxy[0]) * (b.xyxy[3] - b.xyxy[1]) for b in s.boxes)
            assert m.sum() * (48 / 24) ** 2 <= area + 1e-6 and m.sum() > 0


def _run_cli(args, **kw):
    # one intra-op thread in every capture process: kernels then reduce in one fixed order,
    # so two processes given the same batches compute bit-identical results (by construction,
    # not by luck on near-tied random tiny models)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vislens", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _cli_args(tiny_dir, scenes, out):
    return ["capture", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
            "--out", str(out), "--batch-size", "1", "--max-new-tokens", "3", "--quiet",
            "--device", "cpu", *sum((["--condition", c] for c in CONDS), [])]


@pytest.fixture(scope="module")
def clean_cli_run(tiny_dir, scenes, tmp_path_factory):
    """An uninterrupted CLI capture, made like the interrupted ones (same batches, threads)."""
    out = tmp_path_factory.mktemp("clean") / "clean.h5"
    proc = _run_cli(_cli_args(tiny_dir, scenes, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _interrupt_then_resume(tiny_dir, scenes, out, sig):
    """Start a capture, send ``sig`` once 2..7 of 8 samples are done, then rerun it."""
    args = _cli_args(tiny_dir, scenes, out)
    proc = _run_cli(args)
    deadline = time.time() + 120
    stopped_at = None
    while time.time() < deadline and proc.poll() is None:
        if out.exists():
            try:
                with open_capture(out) as c:
                    n_done = int(c.done("adaptvis").sum())
            except Exception:
                n_done = 0
            if 2 <= n_done < 8:
                proc.send_signal(sig)
                stopped_at = n_done
                break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert stopped_at is not None, "capture finished before it could be interrupted"
    with open_capture(out) as c:  # readable after the signal, partial
        assert not c.attrs["complete"] and 2 <= int(c.done("baseline").sum()) < 8
    second = _run_cli(args)
    _, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2
    return proc.returncode, err


def _same_capture(path, ref):
    with open_capture(path) as a, open_capture(ref) as b:
        assert a.attrs["complete"] and list(a.samples["id"]) == list(b.samples["id"])
        for name in b.conditions:
            np.testing.assert_array_equal(a.attention(name), b.attention(name))
            ta, tb = a.table([name]), b.table([name])
            assert list(ta["prediction"]) == list(tb["prediction"])
            np.testing.assert_array_equal(ta["confidence"], tb["confidence"])


@pytest.mark.slow
def test_capture_resumes_after_sigkill(tiny_dir, scenes, tmp_path, clean_cli_run):
    """Kill a real capture process mid-run; the same command finishes it, equal to a clean run."""
    out = tmp_path / "k.h5"
    rc, _ = _interrupt_then_resume(tiny_dir, scenes, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    _same_capture(out, clean_cli_run)


@pytest.mark.slow
def test_sigterm_is_a_clean_resumable_stop(tiny_dir, scenes, tmp_path, clean_cli_run):
    """SIGTERM (a batch scheduler's stop) exits like Ctrl-C: lock released, one line, resumable."""
    out = tmp_path / "t.h5"
    lock = tmp_path / "t.h5.lock"
    rc, err = _interrupt_then_resume(tiny_dir, scenes, out, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not lock.exists()
    _same_capture(out, clean_cli_run)


def test_shards_merge_to_the_unsharded_run(tiny_dir, scenes, tmp_path):
    from vislens.store import merge

    # batch size 1 everywhere: each sample is computed alone in every process, so the
    # merged shards equal the one-process run bit for bit (by construction)
    full = cap(tiny_dir, scenes, tmp_path / "full.h5", batch_size=1)
    parts = [cap(tiny_dir, scenes, tmp_path / "run.h5", shard=f"{i}/3", batch_size=1).path
             for i in range(3)]
    assert parts[1].name == "run.shard1-of-3.h5"
    merged = merge(tmp_path / "merged.h5", parts)
    with open_capture(full.path) as a, open_capture(merged) as b:
        assert list(a.samples["id"]) == list(b.samples["id"])
        for name in a.conditions:
            np.testing.assert_array_equal(a.attention(name), b.attention(name))
            assert list(a.table([name])["prediction"]) == list(b.table([name])["prediction"])
    # other batch compositions (3 per batch in one process, 1 in the shards): padding
    # changes the float rounding, so stored float16 maps agree to one float16 step
    batched = cap(tiny_dir, scenes, tmp_path / "batched.h5", batch_size=3)
    with open_capture(batched.path) as a, open_capture(merged) as b:
        for name in a.conditions:
            x, y = a.attention(name), b.attention(name)
            step = np.spacing(np.abs(y).astype(np.float16)).astype(np.float32)
            assert (np.abs(x - y) <= step).all()


def test_second_writer_is_refused(tiny_dir, scenes, tmp_path):
    out = tmp_path / "busy.h5"
    partial = cap(tiny_dir, scenes, out, limit=2)
    assert partial.complete
    from vislens.data import load_jsonl
    from vislens.decoding import parse_condition

    samples = load_jsonl(scenes)[:2]
    with CaptureWriter.open(tmp_path / "held.h5", samples=samples, conditions=[parse_condition("baseline")],
                            grid=24, num_layers=3, num_heads=4, num_options=4, attrs={"model": "x"}):
        with pytest.raises(VislensError, match="being written by another vislens job"):
            cap(tiny_dir, scenes, tmp_path / "held.h5", conditions=["baseline"], limit=2)


def test_on_error_skip_lists_bad_images(tiny_dir, scenes, tmp_path):
    lines = Path(scenes).read_text().splitlines()[:4]
    recs = [json.loads(l) for l in lines]
    img_dir = Path(scenes).parent
    recs[1]["image"] = str(img_dir / "missing.png")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png")
    recs[2]["image"] = str(bad)
    recs[0]["image"] = str(img_dir / recs[0]["image"])
    recs[3]["image"] = str(img_dir / recs[3]["image"])
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(VislensError, match="missing.png"):
        cap(tiny_dir, data, tmp_path / "stop.h5")
    assert not (tmp_path / "stop.h5").exists()  # nothing written before the check
    s = cap(tiny_dir, data, tmp_path / "skip.h5", on_error="skip")
    assert s.complete and s.n_written == 2
    with open_capture(s.path) as c:
        smp = c.samples
        failed = smp[smp["failed"]]
        assert list(failed["id"]) == [recs[1]["id"], recs[2]["id"]]
        assert "missing.png" in failed["reason"].iloc[0] and "corrupt.png" in failed["reason"].iloc[1]
        assert len(c.table()) == 2 * 3


def test_resume_with_other_conditions_is_refused(tiny_dir, scenes, tmp_path):
    out = tmp_path / "r.h5"
    cap(tiny_dir, scenes, out, limit=2, conditions=["baseline"])
    before = out.read_bytes()
    with pytest.raises(VislensError, match=str(out.name)):
        cap(tiny_dir, scenes, out, limit=2, conditions=["scaling:alpha=2"])
    assert out.read_bytes() == before


@pytest.mark.parametrize("argv, msg", [
    (["--dataset", "whatsup:nope"], "unknown dataset"),
    (["--condition", "scaling:alpha=nan"], "not finite"),
    (["--shard", "3/2"], "--shard"),
    (["--shard", "-1/2"], "--shard '-1/2': need 0 <= I < N"),
    (["--shard", "9/10"], "shard 9 of 10 has no samples (only 8 sample(s) selected)"),
    (["--grid", "100000"], "--grid 100000: must be in 1..256"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--condition", "add:delta=1,heads=99"], "heads=99 is outside the model (valid heads: 0-3)"),
    (["--model", "/no/such/model"], "no such model directory"),
])
def test_cli_bad_input_one_line(tiny_dir, scenes, tmp_path, argv, msg, capsys):
    from vislens.cli import main

    base = {"--model": str(tiny_dir("llava")), "--dataset": f"jsonl:{scenes}",
            "--out": str(tmp_path / "x.h5"), "--condition": "baseline"}
    capsys.readouterr()  # building the tiny model (first use) prints its progress
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    code = main(["capture", "--quiet", *sum(([k, v] for k, v in base.items()), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and msg in err and len(err.splitlines()) == 1


def test_malformed_jsonl_names_file_and_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "image": "x.png", "question": "q", "options": ["A"], "answer": "A"}\n{oops\n')
    with pytest.raises(VislensError, match=r"bad.jsonl:2"):
        cap(tiny_dir, bad, tmp_path / "o.h5")


def test_options_not_in_prompt(tiny_dir, scenes, tmp_path):
    rec = json.loads(Path(scenes).read_text().splitlines()[0])
    rec["options"] = rec["options"] + ["Above"]
    rec["image"] = str(Path(scenes).parent / rec["image"])
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps(rec))
    with pytest.raises(VislensError, match="not offered by its prompt"):
        cap(tiny_dir, p, tmp_path / "o.h5")


def test_option_offered_only_as_part_of_a_word_is_not_offered():
    """"On" is not offered by "left, right, front or behind" ("front" holds "on"), nor "To"
    by "top": options are matched as whole words (they passed as substrings)."""
    from vislens.capture import check_options_in_prompt
    from vislens.data import Sample

    q = "Where is the cup in relation to the plate? Answer with left, right, {}."
    ok = Sample("ok", "", q.format("in front of or behind"), ["Left", "In front of", "Behind"], "Left")
    assert check_options_in_prompt([ok]) == []
    for offered, options in (("front or behind", ["Left", "Right", "On", "Behind"]),
                             ("top or bottom", ["Left", "Right", "To", "Bottom"])):
        s = Sample("s", "", q.format(offered), options, "Left")
        with pytest.raises(VislensError, match=r"sample s: option\(s\) \['(On|To)'\] are not offered"):
            check_options_in_prompt([s])


def test_evaluate_tables(tiny_dir, scenes, tmp_path):
    from vislens.evaluate import evaluate_capture, match_first_word

    s = cap(tiny_dir, scenes, tmp_path / "e.h5")
    tables = evaluate_capture(s.path, tmp_path / "eval")
    acc = tables["accuracy"]
    with open_capture(s.path) as c:
        tab = c.table()
    for name, g in tab.groupby("condition"):
        expect = 100 * np.mean([match_first_word(p, a) for p, a in zip(g["prediction"], g["answer"])])
        row = acc[(acc["matcher"] == "first-word")].loc[name]
        assert row["acc"] == pytest.approx(expect)
        assert "pair_acc" in row and "set_acc" in row
    assert (tmp_path / "eval" / "accuracy.csv").exists()


def test_whatsup_download_with_paper_prompts(tiny_dir, tiny_adapter, tmp_path):
    """A fake WhatsUp download, captured with the published prompts verbatim (--prompt-style paper)."""
    from PIL import Image

    from conftest import random_image
    from vislens.data.whatsup import SUBSETS
    from vislens.decoding import run_conditions

    root = tmp_path / "whatsup"
    (root / "prompts").mkdir(parents=True)
    (root / "controlled_images").mkdir()
    rels = [("on", "On"), ("under", "Under"), ("left_of", "Left"), ("right_of", "Right")]
    prompts = [{"id": i, "question": "<image>\nUSER: Where is the beer bottle in relation to the armchair? "
                "Answer with left, right, on or under.\nASSISTANT:", "answer": [gold]}
               for i, (_, gold) in enumerate(rels)]
    (root / "prompts" / SUBSETS["controlled_a"].prompts_file).write_text(
        "\n".join(json.dumps(p) for p in prompts))
    recs = [{"image_path": f"data/controlled_images/beer-bottle_{r}_armchair.jpeg",
             "caption_options": [f"A beer bottle {r} a armchair", "x", "y", "z"]} for r, _ in rels]
    (root / "controlled_images_dataset.json").write_text(json.dumps(recs))
    for k, (r, _) in enumerate(rels):
        random_image(20 + k, (64, 48)).save(root / "controlled_images" / f"beer-bottle_{r}_armchair.jpeg")
    s = run_capture(model=str(tiny_dir("llava")), dataset="whatsup:controlled_a", data_root=str(root),
                    out=tmp_path / "w.h5", conditions=["baseline"], max_new_tokens=2, device="cpu",
                    prompt_style="paper", progress=False, log=lambda m: None)
    images = [Image.open(root / "controlled_images" / f"beer-bottle_{r}_armchair.jpeg").convert("RGB")
              for r, _ in rels]
    ref = run_conditions(tiny_adapter("llava"), images, [p["question"] for p in prompts],
                         [["Left", "Right", "On", "Under"]] * 4, ["baseline"], max_new_tokens=2)
    with open_capture(s.path) as c:
        assert c.attrs["prompt_style"] == "paper" and list(c.samples["group"]) == ["beer-bottle|armchair"] * 4
        np.testing.assert_allclose(c.attention("baseline"), np.stack([r["baseline"].image_attention for r in ref]),
                                   atol=2e-3)
        assert list(c.table()["prediction"]) == [r["baseline"].text for r in ref]
    with pytest.raises(VislensError, match="no published prompt"):
        cap(tiny_dir, _scene_file(tmp_path), tmp_path / "p.h5",
            prompt_style="paper")


def _scene_file(tmp_path):
    from vislens.synth import generate_groups, write_scenes

    return write_scenes(generate_groups(1, "a", seed=9), tmp_path / "sc", name="a.jsonl")


# ----------------------------------------------------------------------------- data safety
# (issue 11: every check before any file and any weights; lock first; full disk; edits)

from small_disk import fill, read_only_folder, small_disk  # noqa: E402,F401


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a capture loads model weights."""
    import vislens.models

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(vislens.models, "load_model", refuse)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "--max-new-tokens 0"),
    (dict(conditions=["baseline", "add:delta=1,heads=99"]), "condition add\\+1: heads=99 is outside the model"),
    (dict(conditions=["scaling:alpha=2,layers=7"]), r"layers=7 is outside the model \(valid layers: 0-2\)"),
    (dict(grid=100000), "--grid 100000"),
    (dict(grid=256, batch_size=10**6), "needs about .* GiB .* available; lower --batch-size"),
    (dict(shard="9/10"), "has no samples"),
    (dict(batch_size=0), "--batch-size 0"),
])
def test_job_checks_come_before_any_file_and_weights(tiny_dir, scenes, tmp_path, no_weights,
                                                      kw, msg):
    with pytest.raises(VislensError, match=msg) as exc:
        cap(tiny_dir, scenes, tmp_path / "x.h5", **kw)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # no working file, no lock: the fixed rerun just runs


def test_lock_is_taken_before_the_model_loads(tiny_dir, scenes, tmp_path, no_weights):
    from vislens.data import load_jsonl
    from vislens.decoding import parse_condition

    held = tmp_path / "held.h5"
    with CaptureWriter.open(held, samples=load_jsonl(scenes)[:2], conditions=[parse_condition("baseline")],
                            grid=24, num_layers=3, num_heads=4, num_options=4, attrs={"model": "x"}):
        with pytest.raises(VislensError, match="being written by another vislens job"):
            cap(tiny_dir, scenes, held, conditions=["baseline"], limit=2)
    link = tmp_path / "link.h5"  # another name of a file being written: the same lock
    link.symlink_to(held)
    with CaptureWriter.open(held, samples=load_jsonl(scenes)[:2], conditions=[parse_condition("baseline")],
                            grid=24, num_layers=3, num_heads=4, num_options=4, attrs={"model": "x"}):
        with pytest.raises(VislensError, match="being written by another vislens job"):
            cap(tiny_dir, scenes, link, conditions=["baseline"], limit=2)


def test_read_only_or_missing_output_folder_before_the_model(tiny_dir, scenes, tmp_path,
                                                             small_disk, no_weights):
    with pytest.raises(VislensError, match="folder .*nowhere does not exist"):
        cap(tiny_dir, scenes, tmp_path / "nowhere" / "x.h5")
    ro = read_only_folder(small_disk, tmp_path)
    if os.access(ro, os.W_OK):
        pytest.skip("this user can write any folder")
    with pytest.raises(VislensError, match="is not writable") as exc:
        cap(tiny_dir, scenes, ro / "x.h5")
    assert "\n" not in str(exc.value)


def test_disk_too_small_is_refused_before_the_model(tiny_dir, scenes, tmp_path, small_disk,
                                                    no_weights):
    disk = small_disk("1m")
    if disk is None:
        pytest.skip("cannot mount a small filesystem here (the store tests inject ENOSPC)")
    with pytest.raises(VislensError, match=r"the working file needs \d+\.\d MiB but only "
                                           r"\d+\.\d [KM]iB are free") as exc:
        cap(tiny_dir, scenes, disk / "x.h5")
    assert "\n" not in str(exc.value) and list(disk.iterdir()) == []


def test_disk_full_during_capture_then_resume(tiny_dir, scenes, tmp_path, small_disk,
                                              monkeypatch, capfd):
    """The trial's reproduction: the disk fills once the working file exists. The job ends
    with one line, and the same command after freeing space writes the file an
    uninterrupted run writes."""
    from test_store import same_content

    from vislens import store
    from vislens.cli import main

    disk = small_disk("3m")
    if disk is None:  # no mount: the store tests cover injected ENOSPC at the write layer
        pytest.skip("cannot mount a small filesystem here")
    ref = cap(tiny_dir, scenes, tmp_path / "ref.h5", batch_size=3)
    out = disk / "c.h5"
    fillers = []
    real_write = store.CaptureWriter.write_batch

    def write_then_fill(self, *a, **k):
        if not fillers:
            fillers.append(fill(disk))
        return real_write(self, *a, **k)

    monkeypatch.setattr(store.CaptureWriter, "write_batch", write_then_fill)
    argv = ["capture", "--quiet", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
            "--out", str(out), "--batch-size", "3", "--max-new-tokens", "3", "--device", "cpu",
            *sum((["--condition", c] for c in CONDS), [])]
    capfd.readouterr()
    assert main(argv) == 2
    err = [line for line in capfd.readouterr().err.split("\n")  # less transformers' loading bar
           if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("vislens: error: ") and \
        "No space left on device" in err[0] and "intact" in err[0], err
    assert not (disk / "c.h5.lock").exists() and not (disk / "c.h5.tmp").exists()
    with open_capture(out) as c:
        assert not c.complete and c.n_done == 8  # every batch landed in its reserved blocks
    fillers[0].unlink()
    assert main(argv) == 0
    assert "Exception ignored" not in capfd.readouterr().err
    same_content(out, ref.path)


def test_resume_refuses_an_edited_dataset(tiny_dir, scenes, tmp_path):
    """Editing a question or answer (same ids) between runs is refused, naming the sample."""
    recs = [json.loads(line) for line in Path(scenes).read_text().splitlines()]
    for r in recs:
        r["image"] = str(Path(scenes).parent / r["image"])
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "e.h5"
    cap(tiny_dir, data, out, conditions=["baseline"], limit=3)
    before = out.read_bytes()
    recs[1]["answer"] = next(o for o in recs[1]["options"] if o != recs[1]["answer"])
    data.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(VislensError, match=rf"cannot resume: samples/answer\[1\] \(sample "
                                           rf"'{recs[1]['id']}'\)"):
        cap(tiny_dir, data, out, conditions=["baseline"], limit=3)
    assert out.read_bytes() == before


def test_shards_of_samples_with_different_option_counts_merge(tiny_dir, scenes, tmp_path):
    """The option count (num_options, columns of option_probs) is the selection's, not the
    shard's: shards whose own samples have fewer options still merge, and the merged file
    holds what the one-process run holds."""
    from vislens.store import merge

    recs = [json.loads(line) for line in Path(scenes).read_text().splitlines()]
    for i, r in enumerate(recs):
        r["image"] = str(Path(scenes).parent / r["image"])
        if i % 2 == 0:  # shard 0/2 gets only two-option samples
            r["options"] = [r["answer"], next(o for o in r["options"] if o != r["answer"])]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    widest = max(len(r["options"]) for r in recs)
    assert widest > 2
    kw = dict(conditions=["baseline"], batch_size=1, limit=4)
    full = cap(tiny_dir, data, tmp_path / "full.h5", **kw)
    parts = [cap(tiny_dir, data, tmp_path / "run.h5", shard=f"{i}/2", **kw).path for i in range(2)]
    for p in parts:
        with h5py.File(p, "r") as f:
            assert f.attrs["num_options"] == widest
            assert f["conditions/baseline/option_probs"].shape[1] == widest
    merged = merge(tmp_path / "merged.h5", parts)
    with open_capture(full.path) as a, open_capture(merged) as b:
        assert list(b.samples["id"]) == [r["id"] for r in recs[:4]]
        assert list(b.samples["options"]) == [r["options"] for r in recs[:4]]
        pa = a.table(["baseline"], done_only=False)
        pb = b.table(["baseline"], done_only=False)
        assert list(pa["prediction"]) == list(pb["prediction"])
        np.testing.assert_array_equal(a.attention("baseline"), b.attention("baseline"))


def test_merge_cli_refuses_existing_output(tiny_dir, scenes, tmp_path, capsys):
    from vislens.cli import main

    parts = [cap(tiny_dir, scenes, tmp_path / "run.h5", shard=f"{i}/2", limit=4,
                 conditions=["baseline"]).path for i in range(2)]
    keep = tmp_path / "keep.h5"
    keep.write_text("not a capture")
    assert main(["merge", str(keep), *map(str, parts)]) == 2
    assert "--force" in capsys.readouterr().err and keep.read_text() == "not a capture"
    assert main(["merge", "--force", str(keep), *map(str, parts)]) == 0
    with open_capture(keep) as c:
        assert c.complete and len(c) == 4
    assert main(["merge", str(tmp_path / "no" / "m.h5"), *map(str, parts)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_evaluate_and_report_folders_follow_the_output_rule(tiny_dir, scenes, tmp_path, capsys):
    from vislens.cli import main

    s = cap(tiny_dir, scenes, tmp_path / "c.h5", conditions=["baseline"], limit=4)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.md").write_text("keep")
    capsys.readouterr()
    for cmd in ("evaluate", "report"):
        assert main([cmd, str(s.path), "--out", str(theirs)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--force" in err
        assert sorted(p.name for p in theirs.iterdir()) == ["notes.md"]
    assert main(["evaluate", str(s.path), "--out", str(tmp_path / "ev")]) == 0
    assert main(["evaluate", str(s.path), "--out", str(tmp_path / "ev")]) == 0  # its own folder
    assert main(["evaluate", str(s.path), "--out", str(theirs), "--force"]) == 0
    assert (theirs / "notes.md").read_text() == "keep" and (theirs / "accuracy.csv").exists()
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "notes.md").write_text("keep")
    capsys.readouterr()
    assert main(["sweep", "--model", str(tiny_dir("llava")), "--dataset", f"jsonl:{scenes}",
                 "--out", str(tmp_path / "sw"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err


def test_model_dims_read_the_config_only(tiny_dir, tiny_adapter, monkeypatch):
    from vislens.models import model_dims

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tiny_adapter("llava")
    assert model_dims(tiny_dir("llava")) == (adapter.num_layers, adapter.num_heads) == (3, 4)
    assert model_dims("organism") == (4, 4)
    with pytest.raises(VislensError, match="not in the hub cache .*offline") as exc:
        model_dims("someone/not-a-cached-model")
    assert "\n" not in str(exc.value)
    with pytest.raises(VislensError, match="no such model directory"):
        model_dims("/no/such/model")


def test_loaded_model_refuses_a_dtype_or_device_it_does_not_have(tiny_adapter, scenes, tmp_path):
    """A loaded adapter runs as loaded: another dtype/device is refused in one line before
    anything is written; "auto" or its own dtype/device run."""
    adapter = tiny_adapter("llava")
    weight = adapter.model.get_input_embeddings().weight
    assert (weight.dtype, weight.device.type) == (torch_dtype("float32"), "cpu")
    out = tmp_path / "o.h5"
    for kw, msg in (({"dtype": "bfloat16"}, "dtype 'bfloat16': .* loaded in float32"),
                    ({"dtype": "float16", "device": "auto"}, "loaded in float32"),
                    ({"device": "cuda"}, "device 'cuda': .* loaded on cpu"),
                    ({"device": "cuda:1"}, "loaded on cpu"),
                    ({"device": "balanced"}, "loaded on cpu"),
                    ({"device": "gpu"}, "loaded on cpu")):
        args = dict(model=adapter, dataset=f"jsonl:{scenes}", out=out, conditions=["baseline"],
                    limit=2, max_new_tokens=2, progress=False, log=lambda m: None)
        with pytest.raises(VislensError, match=msg) as exc:
            run_capture(**{**args, "device": "auto", **kw})
        assert "\n" not in str(exc.value)
        assert not out.exists() and not Path(f"{out}.lock").exists()
    for kw in ({"dtype": "auto", "device": "auto"}, {"dtype": "float32", "device": "cpu"},
               {"dtype": "fp32", "device": "cpu"}):
        s = run_capture(**{**args, "out": tmp_path / f"{kw['dtype']}.h5", **kw})
        assert s.complete and s.n_written == 2
    assert weight.dtype == torch_dtype("float32")  # nothing converted the loaded model
    from vislens.sweep import run_sweep

    with pytest.raises(VislensError, match="dtype 'bfloat16': .* loaded in float32"):
        run_sweep(model=adapter, dataset=f"jsonl:{scenes}", out=tmp_path / "sw",
                  dtype="bfloat16", progress=False, log=lambda m: None)
    assert not (tmp_path / "sw").exists()


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def test_ray_session_is_closed_when_closing_the_file_fails(tiny_dir, tiny_adapter, scenes,
                                                            tmp_path, monkeypatch):
    """A failing ``writer.close()`` still closes the Ray session (no leaked workers) and is
    the error raised; an error of the job itself stays the error raised (the close failure
    is logged)."""
    import vislens.distributed as dist

    closed: list[str] = []

    class Session:  # stands for the cluster + pool (the tiny adapter plays the pool)
        pool = tiny_adapter("llava")

        def close(self) -> None:
            closed.append("session")

    monkeypatch.setattr(dist, "open_session", lambda *a, **kw: Session())
    real_close = CaptureWriter.close

    def failing_close(self) -> None:
        real_close(self)
        closed.append("writer")
        raise VislensError(f"{self.path}: closing the capture failed (disk gone)")

    monkeypatch.setattr(CaptureWriter, "close", failing_close)
    logs: list[str] = []
    kw = dict(conditions=["baseline"], limit=2, ray="local", log=logs.append)
    with pytest.raises(VislensError, match="closing the capture failed"):
        cap(tiny_dir, scenes, tmp_path / "a.h5", **kw)
    assert closed == ["writer", "session"]

    closed.clear()

    def boom(self, *a, **k):
        raise VislensError("write_batch failed (boom)")

    monkeypatch.setattr(CaptureWriter, "write_batch", boom)
    with pytest.raises(VislensError, match=r"write_batch failed \(boom\)"):
        cap(tiny_dir, scenes, tmp_path / "b.h5", **kw)
    assert closed == ["writer", "session"]
    assert any("closing the capture failed" in m for m in logs), logs


def test_a_capture_stores_the_records_own_split(tiny_dir, scenes, tmp_path):
    """The JSONL ``split`` field decides the split the capture stores (and findings, figures
    and the sweep read back); records without it keep the hash split."""
    recs = [json.loads(line) for line in Path(scenes).read_text().splitlines()]
    for r in recs:
        r["image"] = str(Path(scenes).parent / r["image"])
    assert len({r["group"] for r in recs[:4]}) == 1 and recs[4]["group"] != recs[3]["group"]
    for r, split in zip(recs, ["val", "test", "test", "test", "val"]):
        r["split"] = split  # a group split in two: no hash split does that
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    s = cap(tiny_dir, data, tmp_path / "s.h5", conditions=["baseline"], max_new_tokens=1, split="all")
    with open_capture(s.path) as c:
        stored = dict(zip(c.samples["id"], c.samples["split"]))
    # records 5-7 name none and follow record 4, their group's
    assert [stored[r["id"]] for r in recs] == ["val", "test", "test", "test"] + ["val"] * 4
    v = cap(tiny_dir, data, tmp_path / "v.h5", conditions=["baseline"], max_new_tokens=1, split="val")
    with open_capture(v.path) as c:
        assert list(c.samples["id"]) == [recs[0]["id"]] + [r["id"] for r in recs[4:]]


def _qwen_data(tmp_path, sizes):
    """A JSONL dataset of plain (box-free) samples with random images of the given sizes."""
    from conftest import random_image

    q = "Where is the ball in relation to the box? Answer with left, right, on or under."
    recs = []
    for k, size in enumerate(sizes):
        path = tmp_path / f"img{k}.png"
        random_image(60 + k, size).save(path)
        recs.append({"id": f"s{k}", "image": path.name, "question": q,
                     "options": ["Left", "Right", "On", "Under"], "answer": "Left"})
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    return data


def test_a_sample_the_processor_refuses_is_named_or_skipped_not_its_whole_batch(
        tiny_dir, tiny_adapter, tmp_path):
    """Qwen2-VL's processor refuses an image of aspect ratio > 200 (it decodes fine): that
    sample, not its batch, is the failure. Without --on-error skip the error names it; with
    skip its batch-mates are captured as if it had been left out of the batch (reference:
    the engine on those samples alone, no failing sample in sight)."""
    from PIL import Image

    from vislens.decoding import DecodingEngine, parse_condition

    data = _qwen_data(tmp_path, [(60, 40), (1000, 2), (44, 52)])
    kw = dict(model=str(tiny_dir("qwen2_vl")), dataset=f"jsonl:{data}", conditions=CONDS,
              batch_size=3, max_new_tokens=3, device="cpu", progress=False, log=lambda m: None)
    with pytest.raises(VislensError, match=r"^sample s1: .*aspect ratio") as exc:
        run_capture(out=tmp_path / "stop.h5", **kw)
    assert "\n" not in str(exc.value)
    s = run_capture(out=tmp_path / "skip.h5", on_error="skip", **kw)
    assert s.complete and (s.n_written, s.n_failed) == (2, 1)
    engine = DecodingEngine(tiny_adapter("qwen2_vl"), max_new_tokens=3)
    good = [0, 2]
    images = [Image.open(tmp_path / f"img{k}.png").convert("RGB") for k in good]
    q = json.loads(data.read_text().splitlines()[0])["question"]
    ref = engine.run(images, [q] * 2, [["Left", "Right", "On", "Under"]] * 2,
                     [parse_condition(c) for c in CONDS], sample_keys=["s0", "s2"])
    with open_capture(s.path) as c:
        smp = c.samples
        assert list(smp["failed"]) == [False, True, False]
        assert "aspect ratio" in smp["reason"].iloc[1]
        tab = c.table()
        for name in c.conditions:
            t = tab[tab["condition"] == name].sort_values("row")
            assert list(t["row"]) == good
            assert list(t["prediction"]) == [r[name].text for r in ref]
            np.testing.assert_allclose(t["confidence"], [r[name].confidence for r in ref],
                                       rtol=1e-4)
            np.testing.assert_allclose(c.attention(name)[good],
                                       np.stack([r[name].image_attention for r in ref]),
                                       atol=2e-3)


def test_a_ray_worker_reports_a_refused_sample_and_runs_its_batch_mates(tiny_dir, tmp_path):
    """The worker side of --ray (no cluster needed: the actor class is plain Python) treats a
    sample the engine refuses as a failure of that row and answers the others."""
    from vislens.capture import run_batches, select_samples
    from vislens.decoding import DecodingEngine, parse_condition
    from vislens.distributed import Replica, make_jobs

    data = _qwen_data(tmp_path, [(60, 40), (1000, 2), (44, 52)])
    samples, rows = select_samples(f"jsonl:{data}", None)
    conds = [parse_condition(c) for c in CONDS]
    engine = {"max_new_tokens": 2, "grid": 24, "attention_dtype": "float16"}
    (job,) = make_jobs(samples, rows, conds, batch_size=3, engine=engine,
                       on_failure=lambda r, why: None)
    worker = Replica(str(tiny_dir("qwen2_vl")), "float32", "cpu")
    out = worker.run(job)
    assert out.rows == [0, 2] and [r for r, _ in out.failures] == [1]
    assert out.failures[0][1].startswith("sample s1: ") and "aspect ratio" in out.failures[0][1]
    assert out.sizes == [(60, 40), (44, 52)]
    import torch

    failed: list[int] = []
    local = list(run_batches(DecodingEngine(worker.adapter, max_new_tokens=2,
                                            attention_dtype=torch.float16),
                             samples, rows, conds, batch_size=3,
                             on_failure=lambda r, why: failed.append(r)))
    assert failed == [1] and [b.rows for b in local] == [[0, 2]]
    for got, ref in zip(out.results, local[0].results):
        for name in ref:
            assert got[name].text == ref[name].text
            np.testing.assert_array_equal(got[name].image_attention, ref[name].image_attention)


def test_paper_prompts_that_a_model_cannot_take_verbatim_are_refused(tiny_dir, tiny_adapter,
                                                                       tmp_path):
    """--prompt-style paper promises the published LLaVA-1.5 prompt strings verbatim. A model
    whose image placeholder is not their ``<image>`` (Qwen2-VL) would wrap the whole string,
    its USER:/ASSISTANT: and a literal "<image>", in its own chat template: refused before the
    output exists. LLaVA takes them verbatim (the prompt the engine runs is the string)."""
    data = _qwen_data(tmp_path, [(60, 40), (44, 52)])
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    for r in recs:
        r["meta"] = {"prompt": f"USER: <image>\n{r['question']} ASSISTANT:"}
    data.write_text("\n".join(json.dumps(r) for r in recs))
    kw = dict(dataset=f"jsonl:{data}", conditions=["baseline"], max_new_tokens=1,
              device="cpu", prompt_style="paper", progress=False, log=lambda m: None)
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        for model in (str(tiny_dir(arch)), tiny_adapter(arch)):
            out = tmp_path / f"{arch}.h5"
            with pytest.raises(VislensError, match=r"--prompt-style paper: .*sample s0.*verbatim") as e:
                run_capture(model=model, out=out, **kw)
            assert "\n" not in str(e.value) and not out.exists()
    llava = tiny_adapter("llava")
    assert llava.prepare([random_image_for_test()], [recs[0]["meta"]["prompt"]]).prompts == \
        [recs[0]["meta"]["prompt"]]
    s = run_capture(model=llava, out=tmp_path / "llava.h5", **kw)
    assert s.complete and s.n_written == 2


def random_image_for_test():
    from conftest import random_image

    return random_image(1)
