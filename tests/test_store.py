"""Capture store: round trip, crash safety under SIGKILL, resume checks, finalize, merge.

A deterministic generator gives every (sample, condition) its own arrays, so any row read
back can be checked exactly against a fresh regeneration.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from vislens.conditions import Condition, ConditionResult
from vislens.data.base import Box, Sample
from vislens.errors import VislensError
from vislens.store import (FORMAT, FORMAT_VERSION, PREDICTION_BYTES, CaptureWriter, merge,
                           open_capture, shard_path)

TESTS = Path(__file__).resolve().parent
L, H, G, K = 2, 2, 4, 3
SEED = 20250


CONDS = (Condition("baseline", "baseline"),
         Condition("scaling-0.5", "scaling", (("alpha", 0.5),), layers=(0, 1)))
OPTIONS = ["Left", "Right", "On"]
ATTRS = {"model": "tiny/llava", "model_revision": "abc", "dataset": "synthetic",
         "max_new_tokens": 4, "matcher": "paper"}


def make_samples(n: int, offset: int = 0) -> list[Sample]:
    return [Sample(id=f"s{i:04d}", image_path=f"images/{i}.jpg", question=f"Where is mug {i}?",
                   options=OPTIONS[:2 + i % 2], answer=OPTIONS[i % 2],
                   relation=OPTIONS[i % 2].lower(), group=f"g{i // 4}", split="test",
                   boxes=[Box("mug", (1.0, 2.0, 3.0 + i, 4.0))])
            for i in range(offset, offset + n)]


def gen(row: int, ci: int) -> ConditionResult:
    """The deterministic result of dataset position ``row`` under condition ``ci``."""
    rng = np.random.default_rng([SEED, row, ci])
    nopt = 2 + row % 2
    probs = rng.dirichlet(np.ones(nopt)).astype(np.float32)
    return ConditionResult(
        text=f"answer {row}/{ci} " + "é" * (row % 4),
        first_token=row,
        confidence=float(probs.max()),
        option_probs=probs,
        alpha_used=0.5 * (ci + 1),
        image_attention=rng.random((L, H, G, G)).astype(np.float16).astype(np.float32),
        image_mass=rng.random((L, H)).astype(np.float32),
        text_mass=rng.random((L, H)).astype(np.float32),
    )


def gold_correct(row: int, ci: int) -> bool:
    return (row + ci) % 3 == 0


def fails(row: int) -> bool:
    return row % 11 == 7


def open_writer(path: Path, n: int, *, offset: int = 0, conds=CONDS, attrs=None,
                boxes: bool = True, **kw) -> CaptureWriter:
    samples = make_samples(n, offset)
    masks = np.stack([np.full((G, G), (i % 5) / 4, dtype=np.float32)
                      for i in range(offset, offset + n)]) if boxes else None
    return CaptureWriter.open(
        path, samples=samples, conditions=conds, grid=G, num_layers=L, num_heads=H,
        num_options=K, attrs=attrs or ATTRS,
        sample_index=list(range(offset, offset + n)), box_masks=masks,
        boxes=[s.boxes for s in samples] if boxes else None, **kw)


def write_rows(w: CaptureWriter, rows, index: np.ndarray | None = None) -> None:
    """Write ``rows`` (file rows) in one batch; failing ones as failures."""
    rows = list(rows)
    pos = (lambda r: r) if index is None else (lambda r: int(index[r]))
    good = [r for r in rows if not fails(pos(r))]
    for r in rows:
        if fails(pos(r)):
            w.write_failure(r, f"cannot open image {pos(r)}: broken\nsecond line")
    w.write_batch(good, [{c.name: gen(pos(r), ci) for ci, c in enumerate(CONDS)} for r in good],
                  [{c.name: gold_correct(pos(r), ci) for ci, c in enumerate(CONDS)} for r in good],
                  sizes=[(100 + pos(r), 50) for r in good])


def final_file(path: Path, n: int, **kw) -> Path:
    """A complete capture of ``n`` generated rows (row 7 fails)."""
    with open_writer(path, n, **kw) as w:
        write_rows(w, range(n))
        w.finalize()
    return path


def check_rows(cap, required_all: bool = False) -> int:
    """Every done row equals the generator; returns the number of rows done everywhere."""
    idx = cap.samples["index"].to_numpy()
    smp = cap.samples
    all_done = np.ones(len(cap), dtype=bool)
    for ci, c in enumerate(cap.conditions):
        done = cap.done(c)
        all_done &= done
        rows = np.flatnonzero(done)
        attn = cap.attention(c, rows)
        img, txt = cap.masses(c)
        tab = cap.table([c]).set_index("row")
        for k, r in enumerate(rows):
            ref = gen(int(idx[r]), ci)
            np.testing.assert_array_equal(attn[k], ref.image_attention)
            np.testing.assert_array_equal(img[r], ref.image_mass)
            np.testing.assert_array_equal(txt[r], ref.text_mass)
            t = tab.loc[r]
            assert t["prediction"] == ref.text
            assert t["correct"] == gold_correct(int(idx[r]), ci)
            assert t["confidence"] == np.float32(ref.confidence)
            assert t["alpha_used"] == np.float32(ref.alpha_used)
            for o, p in zip(smp["options"][r], ref.option_probs):
                assert t[f"p_{o}"] == p
            assert smp["width"][r] == 100 + idx[r]
        assert np.isnan(attn).sum() == 0
        assert np.isnan(img[~done]).all()
    failed = smp["failed"].to_numpy()
    for r in np.flatnonzero(failed):
        assert fails(int(idx[r]))
        assert smp["reason"][r] == f"cannot open image {idx[r]}: broken second line"
    if required_all:
        assert (all_done | failed).all()
    return int(all_done.sum())


def child_main(path: str, n: int) -> None:
    """Kill-test child: resume ``path`` and write batch after batch, then finalize."""
    with open_writer(Path(path), n) as w:
        pending = w.pending_indices()
        for i in range(0, len(pending), 3):
            write_rows(w, pending[i:i + 3])
            print("batch", flush=True)
        w.finalize()
        print("finalized", flush=True)


# ----------------------------------------------------------------------------- tests


def test_shard_path():
    assert shard_path("out/run.h5", 1, 4) == Path("out/run.shard1-of-4.h5")
    assert shard_path("run", 0, 2) == Path("run.shard0-of-2.h5")
    with pytest.raises(VislensError):
        shard_path("run.h5", 4, 4)


def test_float16_conversion_is_exact():
    from vislens.store.format import to_f16

    rng = np.random.default_rng(0)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519, 65520, 1e10, -1e-8, 2.0**-14,
                     2.0**-14 * (1 - 2.0**-11), 2.0**-25, 3 * 2.0**-25, 2.0**-24, -2.0**-24,
                     1.5 * 2.0**-24, 2.5 * 2.0**-24, 1e-45], dtype=np.float32)
    vals = np.concatenate([edge, (rng.standard_normal(100_000)
                                  * 10.0 ** rng.uniform(-12, 6, 100_000)).astype(np.float32)])
    with np.errstate(all="ignore"):
        ref = vals.astype(np.float16)
    np.testing.assert_array_equal(to_f16(vals).view(np.uint16), ref.view(np.uint16))
    assert np.isnan(to_f16(np.array([np.nan, -np.nan], np.float32))).all()
    assert to_f16(np.ones((2, 3), np.float32)).shape == (2, 3)


def test_lazy_open_capture():
    import vislens
    from vislens import store

    assert vislens.open_capture is store.open_capture


def test_round_trip_working_and_final(tmp_path):
    path = tmp_path / "run.h5"
    n = 12
    w = open_writer(path, n, attrs={"model": "tiny/llava", "shard": None,
                                    "layers_probed": [1, 2], "meta": {"a": 1}})
    assert path.exists() and (tmp_path / "run.h5.lock").exists()
    assert list(w.pending_indices()) == list(range(n))
    write_rows(w, [5, 3, 4, 0])  # unsorted, with a gap
    write_rows(w, [7, 8])  # row 7 fails
    with open_capture(path) as cap:  # readable while the writer holds it
        assert cap.attrs["complete"] is False
        assert check_rows(cap) == 5
        assert cap.table(done_only=False).shape[0] == 2 * n
    assert list(w.pending_indices()) == [1, 2, 6, 9, 10, 11]
    assert w.finalize() == path  # not complete yet: untouched
    write_rows(w, w.pending_indices())
    with open_capture(path) as cap:
        working = {"samples": cap.samples, "table": cap.table(),
                   "attn": cap.attention("scaling-0.5"), "boxes": cap.boxes(),
                   "mask": cap.box_mask(), "masses": cap.masses("baseline")}
        assert h5py.check_string_dtype(cap._f["samples/id"].dtype).length is not None
    w.finalize()
    w.close()
    assert not (tmp_path / "run.h5.tmp").exists() and not (tmp_path / "run.h5.lock").exists()

    with open_capture(path) as cap:
        a = cap.attrs
        assert a["format"] == FORMAT and a["format_version"] == FORMAT_VERSION
        assert a["complete"] is True and a["grid"] == [G, G]
        assert (a["num_layers"], a["num_heads"], a["num_options"]) == (L, H, K)
        assert a["model"] == "tiny/llava" and "shard" not in a
        assert a["layers_probed"] == [1, 2] and a["meta"] == '{"a": 1}'
        assert {"created_utc", "command", "vislens_version", "model_revision"} <= set(a)
        assert cap.conditions == ["baseline", "scaling-0.5"]
        assert cap.condition_attrs("scaling-0.5") == CONDS[1].attrs()
        check_rows(cap, required_all=True)
        ds = cap._f["conditions/baseline/image_attention"]
        assert ds.compression == "gzip" and ds.shuffle and ds.chunks == (1, L, H, G, G)
        assert h5py.check_string_dtype(cap._f["samples/id"].dtype).length is None
        smp = cap.samples
        assert smp["options"][0] == ["Left", "Right"] and smp["options"][1] == OPTIONS
        assert list(smp.columns) == ["id", "question", "answer", "relation", "image_path",
                                     "group", "split", "options", "index", "width", "height",
                                     "n_image_tokens", "n_text_tokens", "failed", "reason"]
        assert smp.equals(working["samples"])
        assert cap.table().equals(working["table"])
        np.testing.assert_array_equal(cap.attention("scaling-0.5"), working["attn"])
        assert np.isnan(cap.attention("baseline", [7])).all()  # failed row
        np.testing.assert_array_equal(cap.attention("baseline", [3, 1, 3], layers=[1, 0]),
                                      cap.attention("baseline")[[3, 1, 3]][:, [1, 0]])
        np.testing.assert_array_equal(cap.attention("baseline", layers=-1)[:, 0],
                                      cap.attention("baseline")[:, 1])
        chunks = list(cap.iter_attention("baseline", chunk=5))
        assert [len(r) for r, _ in chunks] == [5, 5, 1]
        np.testing.assert_array_equal(np.concatenate([x for _, x in chunks]),
                                      cap.attention("baseline", np.concatenate([r for r, _ in chunks])))
        for x, y in zip(cap.masses("baseline"), working["masses"]):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(cap.box_mask(), working["mask"])
        assert cap.boxes().equals(working["boxes"])
        assert list(cap.boxes()["id"]) == [f"s{i:04d}" for i in range(n)]
        tab = cap.table()
        assert {"id", "condition", "method", "prediction", "correct", "confidence", "alpha_used",
                "relation", "group", "answer", "split", "p_Left", "p_Right", "p_On"} <= set(tab)
        assert len(tab) == 2 * (n - 1) and set(tab["method"]) == {"baseline", "scaling"}

    # reopening a complete file with the same spec is a no-op resume
    before = path.read_bytes()
    with open_writer(path, n, attrs={"model": "tiny/llava", "layers_probed": [1, 2],
                                     "meta": {"a": 1}}) as w2:
        assert w2.pending_indices().size == 0
        assert w2.finalize() == path
        with pytest.raises(VislensError, match="complete"):
            write_rows(w2, [0])
    assert path.read_bytes() == before


def test_fast_final_reader_matches_hdf5_decoder(tmp_path, monkeypatch):
    """The threaded chunk decoder (ISA-L or zlib inflate, unshuffle, float16 table) gives
    exactly what HDF5's own filter pipeline gives, every float16 bit pattern included."""
    import zlib

    from vislens.store import reader

    n = 9
    path = final_file(tmp_path / "run.h5", n)
    # the conversion table against numpy's cast, for every float16 bit pattern
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(reader._HALF_TO_SINGLE.view(np.uint32),
                                  every.astype(np.float32).view(np.uint32))
    # random bit patterns in the final file, with signed zeros, subnormals, inf and nan
    codes = np.random.default_rng(1).integers(0, 1 << 16, (n, L, H, G, G)).astype(np.uint16)
    codes.reshape(n, -1)[:, :8] = [0x0000, 0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7E00, 0x7BFF]
    with h5py.File(path, "r+") as f:
        f["conditions/baseline/image_attention"][...] = codes.view(np.float16)
    with h5py.File(path, "r") as f:
        ref = f["conditions/baseline/image_attention"][()].astype(np.float32)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    done = np.flatnonzero(~np.isin(np.arange(n), [r for r in range(n) if fails(r)]))
    for inflate in (reader._inflate, zlib.decompress):
        monkeypatch.setattr(reader, "_inflate", inflate)
        with open_capture(path) as cap:
            got = cap.attention("baseline", done)
            np.testing.assert_array_equal(got.view(np.uint32), ref[done].view(np.uint32))
            # out= receives the same values, in any row order and with layer selection
            buf = np.empty((4, 1, H, G, G), np.float32)
            assert cap.attention("baseline", [8, 0, 3, 5], layers=[1], out=buf) is buf
            np.testing.assert_array_equal(buf, ref[[8, 0, 3, 5]][:, [1]])
            with pytest.raises(VislensError, match="out must be"):
                cap.attention("baseline", [0, 1], out=np.empty((3, L, H, G, G), np.float32))


@pytest.mark.parametrize("prefetch,reuse", [(False, True), (True, False), (True, True)])
def test_iter_attention_prefetch_and_reuse_match_plain(tmp_path, prefetch, reuse):
    n = 23
    path = final_file(tmp_path / "run.h5", n)
    with open_capture(path) as cap:
        plain = [(r, a) for r, a in cap.iter_attention("baseline", chunk=4)]
        seen = []
        for (rows, attn), (ref_rows, ref) in zip(
                cap.iter_attention("baseline", chunk=4, prefetch=prefetch, reuse=reuse), plain):
            np.testing.assert_array_equal(rows, ref_rows)
            np.testing.assert_array_equal(attn, ref)
            seen.append(attn.base if attn.base is not None else attn)
        assert len(seen) == len(plain) == 6  # 21 done rows (two fail) in chunks of 4
        distinct = len({id(b) for b in seen})
        assert distinct == (2 if prefetch else 1) if reuse else distinct == len(seen)
        # layer selection (in any order, repeats allowed) through the reused buffers
        picked = [(r, a.copy()) for r, a in cap.iter_attention(
            "baseline", chunk=4, layers=[1, 0, 1], prefetch=prefetch, reuse=reuse)]
        for (rows, attn), (_, ref) in zip(picked, plain):
            np.testing.assert_array_equal(attn, ref[:, [1, 0, 1]])
        # leaving the loop early shuts the prefetch thread down cleanly
        for rows, _ in cap.iter_attention("baseline", chunk=4, prefetch=prefetch, reuse=reuse):
            break
        np.testing.assert_array_equal(cap.attention("baseline", rows), plain[0][1])


def test_real_condition_objects(tmp_path):
    from vislens.conditions import parse_condition

    conds = [parse_condition("baseline"), parse_condition("scaling:alpha=0.5,layers=0-1"),
             parse_condition("adaptvis:alpha1=0.5,alpha2=1.5,beta=0.3")]
    path = tmp_path / "real.h5"
    samples = make_samples(2)
    with CaptureWriter.open(path, samples=samples, conditions=conds, grid=G, num_layers=L,
                            num_heads=H, num_options=K, attrs={"model": "m"}) as w:
        res = ConditionResult(text="Left", first_token=3, confidence=0.9,
                              option_probs=np.array([0.9, 0.1]), alpha_used=1.0,
                              image_attention=np.ones((L, H, G, G), np.float32),
                              image_mass=np.ones((L, H)), text_mass=np.zeros((L, H)))
        w.write_batch([0, 1], [{c.name: res for c in conds}] * 2,
                      [{c.name: True for c in conds}] * 2)
        w.finalize()
    with open_capture(path) as cap:
        assert cap.conditions == ["baseline", "scaling-0.5", "adaptvis"]
        for c in conds:
            assert cap.condition_attrs(c.name) == c.attrs()
        assert cap.table()["p_Left"].tolist() == [np.float32(0.9)] * 6
    with pytest.raises(VislensError, match=r"attr alpha2"):
        CaptureWriter.open(path, samples=samples, conditions=[
            conds[0], conds[1], parse_condition("adaptvis:alpha1=0.5,alpha2=2,beta=0.3")],
            grid=G, num_layers=L, num_heads=H, num_options=K, attrs={"model": "m"})


@pytest.mark.slow
def test_sigkill_during_writes_then_resume(tmp_path):
    """Kill a writing process with SIGKILL at random points, check, resume, repeat."""
    path = tmp_path / "killed.h5"
    n = 240
    rng = random.Random()
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_store; "
            f"test_store.child_main({str(path)!r}, {n})")
    killed = 0
    for cycle in range(3):
        with open(tmp_path / f"child{cycle}.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=err, cwd=TESTS.parent)
            want = rng.randint(1, 6)
            seen = 0
            while seen < want:
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line.startswith(b"batch")
            time.sleep(rng.uniform(0, 0.01))
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            proc.stdout.close()
        err_text = (tmp_path / f"child{cycle}.err").read_text()
        assert rc in (0, -signal.SIGKILL), err_text
        killed += rc == -signal.SIGKILL
        assert not (tmp_path / "killed.h5.tmp").exists() or rc == -signal.SIGKILL
        with open_capture(path) as cap:
            check_rows(cap)
            if cap.complete:  # the child outran the kill: nothing left to interrupt
                break
    assert killed >= 1
    with open_writer(path, n) as w:  # the dead writer's lock is gone; leftover .tmp removed
        assert not (tmp_path / "killed.h5.tmp").exists()
        pending = w.pending_indices()
        for i in range(0, len(pending), 7):
            write_rows(w, pending[i:i + 7])
        assert w.pending_indices().size == 0
        w.finalize()
    with open_capture(path) as cap:
        assert cap.attrs["complete"] is True
        assert check_rows(cap, required_all=True) == n - sum(fails(i) for i in range(n))


def test_second_writer_refused(tmp_path):
    path = tmp_path / "run.h5"
    w = open_writer(path, 4)
    with pytest.raises(VislensError) as exc:
        open_writer(path, 4)
    assert str(exc.value) == f"{path} is being written by another vislens job (pid {os.getpid()})"
    w.close()
    open_writer(path, 4).close()  # released


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_resume_mismatch_refused(tmp_path):
    path = tmp_path / "run.h5"
    with open_writer(path, 6) as w:
        write_rows(w, [0, 1])
    digest = _md5(path)
    cases = [
        (dict(attrs={"model": "other", "model_revision": "abc", "dataset": "synthetic",
                     "max_new_tokens": 4, "matcher": "paper"}), "model"),
        (dict(attrs={"model": "tiny/llava", "model_revision": "abc", "dataset": "synthetic",
                     "max_new_tokens": 8, "matcher": "paper"}), "attr max_new_tokens"),
        (dict(offset=1), r"samples/id\[0\]"),
        (dict(conds=CONDS[:1]), "conditions"),
        (dict(conds=(CONDS[0], Condition("scaling-0.5", "scaling", (("alpha", 0.6),)))),
         "conditions/scaling-0.5 attr alpha"),
    ]
    for kw, field_name in cases:
        with pytest.raises(VislensError, match=f"cannot resume: {field_name} is") as exc:
            open_writer(path, 6, **kw)
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(str(path))
    with pytest.raises(VislensError, match="number of samples"):
        open_writer(path, 7)
    with pytest.raises(VislensError, match="grid is"):
        CaptureWriter.open(path, samples=make_samples(6), conditions=CONDS, grid=G + 1,
                           num_layers=L, num_heads=H, num_options=K, attrs=ATTRS)
    assert _md5(path) == digest  # nothing modified
    with open_writer(path, 6) as w:  # the right spec resumes
        assert list(w.pending_indices()) == [2, 3, 4, 5]


@pytest.mark.parametrize("attr,value,match", [("format_version", 3, "format_version 3"),
                                              ("format", "something-else", "not a vislens")])
def test_wrong_format_refused(tmp_path, attr, value, match):
    path = tmp_path / "run.h5"
    open_writer(path, 3).close()
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(VislensError, match=match) as exc:
        open_capture(path)
    assert str(path) in str(exc.value)
    with pytest.raises(VislensError, match=match):
        open_writer(path, 3)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(VislensError, match="junk.h5"):
        open_capture(tmp_path / "junk.h5")
    with pytest.raises(VislensError, match="no such"):
        open_capture(tmp_path / "missing.h5")


def test_finalize_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    w = open_writer(path, 8)
    write_rows(w, range(8))

    def broken(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(VislensError, match="working file is intact"):
        w.finalize()
    monkeypatch.undo()
    assert not (tmp_path / "run.h5.tmp").exists()
    with open_capture(path) as cap:
        assert cap.attrs["complete"] is False
        check_rows(cap, required_all=True)
    assert w.finalize() == path  # retry works, writer still usable
    w.close()
    with open_capture(path) as cap:
        assert cap.attrs["complete"] is True
        check_rows(cap, required_all=True)

    # a leftover .tmp (kill during finalize) is removed by the next writer
    other = tmp_path / "b.h5"
    open_writer(other, 2).close()
    (tmp_path / "b.h5.tmp").write_bytes(b"half-written")
    with open_writer(other, 2) as w2:
        assert not (tmp_path / "b.h5.tmp").exists()
        assert w2.pending_indices().size == 2


def _raw_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of raw dataset storage (chunks or contiguous blocks) in ``path``."""
    ranges: list[tuple[int, int]] = []

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset) and obj.size:
            if obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    ranges.append((info.byte_offset, info.byte_offset + info.size))
            else:
                ranges.append((obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return ranges


def test_writer_only_overwrites_raw_data(tmp_path):
    """After creation, writes (batches, rewrites, failures) touch only raw dataset bytes."""
    path = tmp_path / "run.h5"
    open_writer(path, 9).close()
    before = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    with open_writer(path, 9) as w:
        write_rows(w, [0, 1, 2, 3])
        write_rows(w, [2, 8])  # rewrites done row 2
        write_rows(w, [6, 7])  # 7 fails
        w.write_failure(0, "late failure")
    after = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    assert after.size == before.size
    changed = np.flatnonzero(before != after)
    assert changed.size > 0
    ranges = np.array(_raw_ranges(path))
    inside = ((changed[:, None] >= ranges[:, 0]) & (changed[:, None] < ranges[:, 1])).any(axis=1)
    assert inside.all(), f"metadata bytes changed at {changed[~inside][:10]}"


def test_write_batch_validation(tmp_path):
    path = tmp_path / "run.h5"
    with open_writer(path, 3) as w:
        bad = gen(0, 0)
        bad.image_attention = np.zeros((L, H, G + 1, G), np.float32)
        with pytest.raises(VislensError, match="row 0 condition baseline: image_attention shape"):
            w.write_batch([0], [{"baseline": bad, "scaling-0.5": gen(0, 1)}],
                          [{"baseline": True, "scaling-0.5": True}])
        with pytest.raises(VislensError, match="lacks condition 'scaling-0.5'"):
            w.write_batch([0], [{"baseline": gen(0, 0)}], [{"baseline": True}])
        with pytest.raises(VislensError, match="out of range"):
            write_rows(w, [3])
        assert w.pending_indices().size == 3
        long = gen(1, 0)
        long.text = "é" * 200  # 400 bytes
        long.image_attention = None  # not recorded -> NaN
        w.write_batch([1], [{"baseline": long, "scaling-0.5": gen(1, 1)}],
                      [{"baseline": False, "scaling-0.5": True}])
        with open_capture(path) as cap:
            pred = cap.table(["baseline"])["prediction"][0]
            assert pred == "é" * (PREDICTION_BYTES // 2)
            assert np.isnan(cap.attention("baseline", [1])).all()
    with pytest.raises(VislensError, match="more than num_options"):
        CaptureWriter.open(tmp_path / "x.h5", samples=make_samples(3), conditions=CONDS, grid=G,
                           num_layers=L, num_heads=H, num_options=2, attrs={"model": "m"})
    with pytest.raises(VislensError, match="attrs must name the model"):
        CaptureWriter.open(tmp_path / "x.h5", samples=make_samples(3), conditions=CONDS, grid=G,
                           num_layers=L, num_heads=H, num_options=K, attrs={})
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.lock").exists()


def _shard(tmp_path: Path, out: Path, i: int, n: int, total: int, finalize: bool = True) -> Path:
    """Shard i/n (0-based) of ``total`` samples, round-robin: dataset positions i, i+n, ..."""
    index = np.arange(i, total, n)
    samples = [make_samples(1, int(j))[0] for j in index]
    path = shard_path(out, i, n)
    w = CaptureWriter.open(path, samples=samples, conditions=CONDS, grid=G, num_layers=L,
                           num_heads=H, num_options=K, sample_index=index,
                           attrs={"model": "tiny/llava", "shard": f"{i}/{n}"},
                           box_masks=np.stack([np.full((G, G), (j % 5) / 4, np.float32)
                                               for j in index]),
                           boxes=[s.boxes for s in samples])
    write_rows(w, range(len(index)), index=index)
    if finalize:
        w.finalize()
    w.close()
    return path


def test_merge_equals_unsharded(tmp_path):
    total = 14
    full = final_file(tmp_path / "full.h5", total, attrs={"model": "tiny/llava"})
    out = tmp_path / "run.h5"
    shards = [_shard(tmp_path, out, i, 3, total, finalize=i != 1) for i in (0, 1, 2)]
    assert merge(out, shards[::-1]) == out
    with open_capture(out) as m, open_capture(full) as ref:
        assert m.attrs["complete"] is True and "shard" not in m.attrs
        assert m.samples.equals(ref.samples)
        assert m.table().equals(ref.table())
        for c in ref.conditions:
            np.testing.assert_array_equal(m.attention(c), ref.attention(c))
            for x, y in zip(m.masses(c), ref.masses(c)):
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(m.box_mask(), ref.box_mask())
        assert m.boxes().equals(ref.boxes())
        check_rows(m, required_all=True)

    with pytest.raises(VislensError, match=r"missing shard\(s\) 1/3"):
        merge(tmp_path / "m1.h5", [shards[0], shards[2]])
    with pytest.raises(VislensError, match="given twice"):
        merge(tmp_path / "m2.h5", [shards[0], shards[0], shards[2]])
    with pytest.raises(VislensError, match="sample index 0 .* is also in"):
        merge(tmp_path / "m3.h5", [shards[0], full])
    with pytest.raises(VislensError, match="attr model is"):
        odd = tmp_path / "odd.h5"
        with open_writer(odd, 2, offset=100, attrs={"model": "other"}) as w:
            write_rows(w, range(2))
        merge(tmp_path / "m4.h5", [full, odd])
    part = tmp_path / "part.h5"
    with open_writer(part, 3, offset=200, attrs={"model": "tiny/llava"}) as w:
        write_rows(w, [0])
    with pytest.raises(VislensError, match=r"part.h5: merge: 2 sample\(s\) not done \(e.g. s0201"):
        merge(tmp_path / "m5.h5", [full, part])
    assert not any(tmp_path.glob("m*.h5*"))


def test_merge_keeps_detector_unmatched_records(tmp_path):
    """Shards that went through ``vislens boxes`` merge to what the unsharded file gets."""
    from types import SimpleNamespace as NS

    from vislens.store import replace_boxes

    total = 10
    full = final_file(tmp_path / "full.h5", total, attrs={"model": "tiny/llava"})
    out = tmp_path / "run.h5"
    shards = [_shard(tmp_path, out, i, 3, total) for i in range(3)]

    def detect(path: Path) -> None:  # a box for every sample; sample index i misses i % 3 cats
        with open_capture(path) as c:
            idx, mask = c.samples["index"].to_numpy(), c.box_mask()
        replace_boxes(path, mask, [[NS(label="mug", xyxy=(1.0, 2.0, 3.0 + i, 4.0), score=0.5)]
                                   for i in idx], "yolo",
                      unmatched=[[NS(label=f"cat{k}", reason=f"no cat {k} in {i}")
                                  for k in range(i % 3)] for i in idx])

    for p in (full, *shards):
        detect(p)
    merge(out, shards)
    with open_capture(out) as m, open_capture(full) as ref:
        assert len(ref.unmatched()) == sum(i % 3 for i in range(total))
        assert m.unmatched().equals(ref.unmatched())
        assert m.boxes().equals(ref.boxes())


# ----------------------------------------------------------------------------- data safety
# (issue 11: full disk, overwrites, edited content, symlinks, corrupted bytes)

from small_disk import fill, read_only_folder, small_disk  # noqa: E402,F401

BIG_G = 32  # 8 KiB of attention per row and condition: every row needs fresh disk pages


def big_result(row: int, ci: int) -> FakeResult:
    r = gen(row, ci)
    rng = np.random.default_rng([SEED, row, ci, 1])
    r.image_attention = rng.random((L, H, BIG_G, BIG_G)).astype(np.float16)
    return r


def big_writer(path: Path, n: int, **kw) -> CaptureWriter:
    from vislens.store import CaptureJob

    job = CaptureJob(samples=make_samples(n), conditions=CONDS, grid=BIG_G, num_layers=L,
                     num_heads=H, num_options=K, attrs=ATTRS)
    return CaptureWriter.open(path, job, **kw)


def big_rows(w: CaptureWriter, rows) -> None:
    rows = list(rows)
    w.write_batch(rows, [{c.name: big_result(r, ci) for ci, c in enumerate(CONDS)} for r in rows],
                  [{c.name: gold_correct(r, ci) for ci, c in enumerate(CONDS)} for r in rows],
                  sizes=[(100 + r, 50) for r in rows])


def big_final(path: Path, n: int) -> Path:
    with big_writer(path, n) as w:
        big_rows(w, range(n))
        w.finalize()
    return path


def same_content(a_path: Path, b_path: Path) -> None:
    """Two captures hold the same samples, results, attention and boxes."""
    with open_capture(a_path) as a, open_capture(b_path) as b:
        assert a.complete == b.complete
        assert a.samples.equals(b.samples)
        assert a.table(done_only=False).equals(b.table(done_only=False))
        for c in b.conditions:
            np.testing.assert_array_equal(a.attention(c), b.attention(c))
            for x, y in zip(a.masses(c), b.masses(c)):
                np.testing.assert_array_equal(x, y)
        assert (a.boxes() is None) == (b.boxes() is None)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def _fallocate_works(folder: Path) -> bool:
    probe = folder / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_job_object_or_its_fields(tmp_path):
    from vislens.store import CaptureJob

    job = CaptureJob(samples=make_samples(3), conditions=CONDS, grid=G, num_layers=L,
                     num_heads=H, num_options=K, attrs=ATTRS)
    with CaptureWriter.open(tmp_path / "a.h5", job) as w:
        write_rows(w, range(3))
    with open_writer(tmp_path / "b.h5", 3, boxes=False) as w:  # the same job as keywords
        write_rows(w, range(3))
    same_content(tmp_path / "a.h5", tmp_path / "b.h5")
    with pytest.raises(TypeError, match="not both"):
        CaptureWriter.open(tmp_path / "c.h5", job, grid=G)
    assert not (tmp_path / "c.h5.lock").exists()


def test_working_file_reserves_its_disk_blocks(tmp_path):
    if not _fallocate_works(tmp_path):
        pytest.skip("this filesystem cannot reserve blocks")
    path = tmp_path / "run.h5"
    big_writer(path, 64).close()
    st = os.stat(path)
    assert st.st_size > 64 * 2 * 8192  # attention of every row and condition, untouched yet
    assert st.st_blocks * 512 >= st.st_size  # not sparse: the space is taken now


def test_disk_full_is_refused_before_any_sample(tmp_path, small_disk, monkeypatch):
    from vislens.store import writer

    disk = small_disk("1m")
    if disk is None:  # inject: the filesystem says "full" when the blocks are reserved
        disk = tmp_path

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
    else:  # the estimate check first: readable units, never "0.00 GB"
        with pytest.raises(VislensError) as exc:
            big_writer(disk / "run.h5", 64)
        msg = one_line(exc)
        assert re.search(r"needs \d+\.\d MiB but only \d+(\.\d KiB| B) are free", msg), msg
    # an estimate that passes (as on a filesystem whose free space changes meanwhile):
    # reserving the blocks fails at creation, before any sample is computed
    monkeypatch.setattr(writer, "working_file_bytes", lambda *a: 0)
    with pytest.raises(VislensError, match=r"cannot reserve \d+\.\d MiB .*\(No space left on device; ") as exc:
        big_writer(disk / "run.h5", 64)
    one_line(exc)
    assert not [p for p in disk.iterdir() if p.name.startswith("run.h5")]  # no file, .tmp, .lock


def test_disk_full_while_writing_is_reported_before_done(tmp_path, small_disk, monkeypatch):
    """Where blocks cannot be reserved (copy-on-write filesystems), a write that fails is
    one line, its rows are not marked done, and a resume after freeing space gives the
    file an uninterrupted run gives."""
    from vislens.store import writer

    n = 40
    ref = big_final(tmp_path / "ref.h5", n)
    monkeypatch.setattr(writer, "_reserve", lambda path, shown: None)  # a sparse file
    disk = small_disk("3m")
    filler = None
    if disk is None:  # inject ENOSPC at the write layer for rows >= 10
        disk = tmp_path / "inj"
        disk.mkdir()
        real_write = writer.write_rows

        def write(ds, rows, data):
            if filler is not None and ds.name.endswith("image_attention") and rows.max() >= 10:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(ds, rows, data)

        monkeypatch.setattr(writer, "write_rows", write)
    path = disk / "run.h5"
    w = big_writer(path, n)
    big_rows(w, range(10))
    filler = fill(disk) if disk.name != "inj" else True
    with pytest.raises(VislensError, match=r"writing rows 1\d-\d+ failed \(No space left on "
                                           r"device\).* free disk space") as exc:
        for start in range(10, n, 5):
            big_rows(w, range(start, start + 5))
    one_line(exc)
    with pytest.raises(VislensError, match="after a failed write"):
        big_rows(w, [39])
    w.close()  # no second error, no "Exception ignored", lock released
    assert not (disk / "run.h5.lock").exists()
    with open_capture(path) as cap:
        done = cap.done("baseline")
        assert done[:10].all() and not done[10:].any()  # nothing of the failed batch is done
        np.testing.assert_array_equal(cap.attention("baseline", np.arange(10)),
                                      np.stack([big_result(r, 0).image_attention
                                                for r in range(10)]).astype(np.float32))
    if isinstance(filler, Path):
        filler.unlink()
    filler = None
    with big_writer(path, n) as w:  # resume after freeing space
        assert list(w.pending_indices()) == list(range(10, n))
        big_rows(w, w.pending_indices())
        w.finalize()
    same_content(path, ref)


def disk_or_injection(small_disk, size: str, tmp_path: Path, monkeypatch) -> tuple[Path, bool]:
    """A small tmpfs, or (where none can be mounted) a folder where writing any new file of
    the final layout (finalize, merge, boxes) fails with ENOSPC; and whether injected."""
    from vislens.store import compact

    disk = small_disk(size)
    if disk is not None:
        return disk, False

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compact, "build_final", full)
    disk = tmp_path / "inj"
    disk.mkdir()
    return disk, True


def test_disk_full_at_finalize_keeps_the_working_file(tmp_path, small_disk, monkeypatch):
    n = 40
    ref = big_final(tmp_path / "ref.h5", n)
    disk, injected = disk_or_injection(small_disk, "3m", tmp_path, monkeypatch)
    path = disk / "run.h5"
    w = big_writer(path, n)
    filler = None if injected else fill(disk)
    big_rows(w, range(n))  # the reserved blocks take every row although the disk is full
    with pytest.raises(VislensError, match=r"finalize failed \(No space left on device\); the "
                                           r"working file is intact, \d+(\.\d \w+| B) free") as exc:
        w.finalize()
    one_line(exc)
    assert not (disk / "run.h5.tmp").exists()
    with open_capture(path) as cap:
        assert not cap.complete and cap.n_done == n
    if filler is not None:
        filler.unlink()
    monkeypatch.undo()
    assert w.finalize() == path
    w.close()
    same_content(path, ref)


def _merge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vislens", "merge", *args], capture_output=True,
                          text=True, cwd=TESTS.parent, timeout=120)


def test_merge_disk_full_and_missing_folder_are_one_line(tmp_path, small_disk, monkeypatch):
    src = big_final(tmp_path / "src.h5", 40)
    disk, injected = disk_or_injection(small_disk, "256k", tmp_path, monkeypatch)
    if not injected:  # a real process: exactly one line on stderr, no "Exception ignored", no segfault
        r = _merge_cli(str(disk / "m.h5"), str(src))
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr, r.stderr
        assert list(disk.iterdir()) == []
    with pytest.raises(VislensError, match=r"merge failed \(No space left on device") as exc:
        merge(disk / "m.h5", [src])
    one_line(exc)
    assert list(disk.iterdir()) == []  # no output, no .tmp, no stale .lock
    with pytest.raises(VislensError, match="folder .*nowhere does not exist") as exc:
        merge(tmp_path / "nowhere" / "m.h5", [src])
    one_line(exc)


def test_merge_refuses_to_overwrite_unless_forced(tmp_path):
    total = 6
    shards = [_shard(tmp_path, tmp_path / "run.h5", i, 2, total) for i in range(2)]
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    with pytest.raises(VislensError, match="already exists .* --force") as exc:
        merge(out, shards)
    one_line(exc)
    assert out.read_text() == "my notes"
    r = _merge_cli(str(out), *map(str, shards))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    assert out.read_text() == "my notes"
    assert merge(out, shards, force=True) == out
    with open_capture(out) as m:
        assert m.complete and len(m) == total


def test_resume_refuses_edited_sample_content(tmp_path):
    from vislens.store import sample_fingerprint

    img = tmp_path / "img"
    img.mkdir()
    samples = make_samples(4)
    for i, s in enumerate(samples):
        s.image_path = str(img / f"{i}.png")
        Path(s.image_path).write_bytes(bytes([i]) * 100)
    path = tmp_path / "run.h5"

    def writer(smp):
        return CaptureWriter.open(path, samples=smp, conditions=CONDS, grid=G, num_layers=L,
                                  num_heads=H, num_options=K, attrs=ATTRS)

    with writer(samples) as w:
        write_rows(w, [0, 1])
    digest = _md5(path)
    import copy

    cases = [("question", "Where is the cat?", r"samples/question\[2\] \(sample 's0002'\) is "
                                              r"'Where is mug 2\?' in the file but 'Where is the cat\?'"),
             ("answer", "Right", r"samples/answer\[2\] \(sample 's0002'\) is 'Left'"),
             ("options", ["Left", "Under"], r"samples/options\[2\] \(sample 's0002'\)")]
    for field_name, value, match in cases:
        edited = copy.deepcopy(samples)
        setattr(edited[2], field_name, value)
        with pytest.raises(VislensError, match=f"cannot resume: {match}") as exc:
            writer(edited)
        one_line(exc)
    Path(samples[3].image_path).write_bytes(b"another image")  # same path, new bytes
    with pytest.raises(VislensError, match=r"image of sample 's0003' \(row 3, .*3.png\)") as exc:
        writer(samples)
    one_line(exc)
    assert _md5(path) == digest  # nothing modified
    Path(samples[3].image_path).write_bytes(bytes([3]) * 100)
    with writer(samples) as w:  # the same content resumes
        assert list(w.pending_indices()) == [2, 3]
        write_rows(w, [2, 3])
        w.finalize()
    # the final file keeps the fingerprints
    assert _text_of(path, "samples/fingerprint") == [sample_fingerprint(s) for s in samples]
    # a file made before fingerprints existed resumes on its stored text alone
    old = tmp_path / "old.h5"
    with CaptureWriter.open(old, samples=samples, conditions=CONDS, grid=G, num_layers=L,
                            num_heads=H, num_options=K, attrs=ATTRS):
        pass
    with h5py.File(old, "r+") as f:
        del f["samples/fingerprint"]
    Path(samples[3].image_path).write_bytes(b"unverifiable")
    CaptureWriter.open(old, samples=samples, conditions=CONDS, grid=G, num_layers=L, num_heads=H,
                       num_options=K, attrs=ATTRS).close()
    edited = copy.deepcopy(samples)
    edited[1].answer = "Left"
    with pytest.raises(VislensError, match=r"samples/answer\[1\]"):
        CaptureWriter.open(old, samples=edited, conditions=CONDS, grid=G, num_layers=L,
                           num_heads=H, num_options=K, attrs=ATTRS)


def _text_of(path: Path, name: str) -> list[str]:
    with h5py.File(path, "r", locking=False) as f:
        return list(f[name].asstr()[()])


def test_symlinked_output_is_locked_and_stays_a_link(tmp_path):
    target = tmp_path / "data" / "run.h5"
    target.parent.mkdir()
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    other = tmp_path / "other.h5"
    other.symlink_to(target)
    w = open_writer(link, 6)
    assert target.exists() and link.is_symlink()
    with pytest.raises(VislensError, match="being written by another vislens job"):
        open_writer(other, 6)  # another name of the same file
    with pytest.raises(VislensError, match="being written by another vislens job"):
        open_writer(target, 6)
    write_rows(w, range(6))
    assert w.finalize() == link
    w.close()
    assert link.is_symlink() and os.readlink(link) == str(target)
    with open_capture(link) as cap:
        assert cap.complete and check_rows(cap, required_all=True) == 6  # row 7 (fails) not among them
    merged = tmp_path / "merged-link.h5"
    merged.symlink_to(tmp_path / "data" / "merged.h5")
    shards = [_shard(tmp_path, tmp_path / "s.h5", i, 2, 6) for i in range(2)]
    merge(merged, shards)
    assert merged.is_symlink() and (tmp_path / "data" / "merged.h5").exists()


def _corrupt_chunk(path: Path, name: str, row: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
        offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 3)
        fh.write(b"\xde\xad\xbe\xef" * 2)


def test_corrupted_chunks_name_file_condition_and_row(tmp_path):
    path = final_file(tmp_path / "run.h5", 12)
    _corrupt_chunk(path, "conditions/scaling-0.5/image_attention", 3)
    with open_capture(path) as cap:
        good = cap.attention("scaling-0.5", [0, 1, 2])  # other rows still read
        assert good.shape[0] == 3
        for rows in (None, [3], [0, 3, 5, 6, 8]):
            with pytest.raises(VislensError) as exc:
                cap.attention("scaling-0.5", rows)
            msg = one_line(exc)
            assert msg.startswith(str(path)) and "condition 'scaling-0.5'" in msg and \
                "row 3" in msg and "corrupted" in msg, msg
        with pytest.raises(VislensError, match="row 3"):
            list(cap.iter_attention("scaling-0.5", chunk=4, prefetch=True))
    path2 = final_file(tmp_path / "run2.h5", 12)
    with h5py.File(path2, "r") as f:  # 1-D datasets are one chunk: rows 0-11
        n_chunks = f["conditions/baseline/confidence"].id.get_num_chunks()
    _corrupt_chunk(path2, "conditions/baseline/confidence", 0)
    with open_capture(path2) as cap:
        with pytest.raises(VislensError, match=r"condition 'baseline' \(confidence\), rows? 0") as exc:
            cap.table()
        one_line(exc)
        assert n_chunks == 1
    from vislens.evaluate import evaluate_capture

    with pytest.raises(VislensError, match="corrupted"):
        evaluate_capture(path2)


def test_progress_line_of_unfinished_and_complete_captures(tmp_path):
    path = tmp_path / "run.h5"
    with open_writer(path, 16) as w:
        write_rows(w, range(8))  # row 7 fails
        with open_capture(path) as cap:
            assert (cap.n_samples, cap.n_done, cap.n_failed) == (16, 7, 1)
            assert cap.progress_line() == "7 of 16 samples done (unfinished capture, 1 failed)"
        write_rows(w, range(8, 16))
        w.finalize()
    with open_capture(path) as cap:
        assert cap.progress_line() == "16 samples, 1 failed"


def test_parse_shard_is_the_one_shard_syntax():
    from vislens import capture
    from vislens.store import parse_shard, shard_rows

    assert parse_shard("2/4") == (2, 4) and parse_shard([1, 3]) == (1, 3)
    assert capture.parse_shard is parse_shard  # one parser, one syntax
    for bad in ("-1/2", "2/2", "1-of-2", "a/b", "1/0", "3"):
        with pytest.raises(VislensError, match="--shard"):
            parse_shard(bad)
    assert shard_rows(8, (1, 3)) == [1, 4, 7] and shard_rows(3, None) == [0, 1, 2]
    with pytest.raises(VislensError, match=r"shard 9 of 10 has no samples \(only 8"):
        shard_rows(8, (9, 10))


def test_read_only_folder_is_one_line(tmp_path, small_disk):
    ro = read_only_folder(small_disk, tmp_path)
    if os.access(ro, os.W_OK):
        pytest.skip("this user can write any folder")
    with pytest.raises(VislensError, match="not writable") as exc:
        open_writer(ro / "run.h5", 3)
    one_line(exc)
    src = final_file(tmp_path / "src.h5", 3)
    with pytest.raises(VislensError, match="not writable"):
        merge(ro / "m.h5", [src])


def test_check_output_rule(tmp_path):
    """Create, or rewrite what vislens created; anything else only with --force."""
    from vislens.io import MARKER, check_output, human_bytes, prepare_output_dir

    assert human_bytes(0) == "0 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"
    new = tmp_path / "new.h5"
    assert check_output(new) == new
    new.write_text("x")
    with pytest.raises(VislensError, match="already exists .* --force"):
        check_output(new)
    assert check_output(new, force=True) == new
    with pytest.raises(VislensError, match="folder .*missing does not exist"):
        check_output(tmp_path / "missing" / "f.h5")
    out = prepare_output_dir(tmp_path / "a" / "report")  # parents created, marked
    assert (out / MARKER).exists()
    (out / "table.csv").write_text("old")
    assert prepare_output_dir(out) == out  # its own folder: rewritten freely
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(VislensError, match="did not create and it is not empty"):
        prepare_output_dir(mine)
    assert prepare_output_dir(mine, force=True) == mine and (mine / "thesis.tex").exists()
    assert prepare_output_dir(tmp_path / "empty-dir") == tmp_path / "empty-dir"


class _Killed(BaseException):
    """A kill injected between two writes of the writer (not an error it could handle)."""


def _flags(path: Path, row: int) -> tuple[list[bool], bool]:
    """(done per condition, failed) of ``row``, read with plain h5py."""
    with h5py.File(path, "r", locking=False) as f:
        done = [bool(f[f"conditions/{c.name}/done"][row]) for c in CONDS]
        return done, bool(f["errors/failed"][row])


def test_rewriting_a_failed_row_never_leaves_it_done_and_failed(tmp_path, monkeypatch):
    """A kill at any write of ``write_batch`` over a failed row leaves it failed (and not
    done) or pending, never done and failed at once; a row done everywhere holds its data."""
    import shutil

    import vislens.store.writer as writer_mod

    template = tmp_path / "template.h5"
    with open_writer(template, 4) as w:
        write_rows(w, [0, 2, 3])
        w.write_failure(1, "cannot open image 1")
    assert _flags(template, 1) == ([False, False], True)
    real_write = writer_mod.write_rows
    calls = []

    def counting(ds, rows, data):
        calls.append(ds.name)
        real_write(ds, rows, data)

    def rewrite(path: Path) -> None:
        with open_writer(path, 4) as w:
            w.write_batch([1], [{c.name: gen(1, ci) for ci, c in enumerate(CONDS)}],
                          [{c.name: gold_correct(1, ci) for ci, c in enumerate(CONDS)}])

    shutil.copy(template, tmp_path / "count.h5")
    monkeypatch.setattr(writer_mod, "write_rows", counting)
    rewrite(tmp_path / "count.h5")
    assert _flags(tmp_path / "count.h5", 1) == ([True, True], False)
    n_writes = len(calls)
    assert "/errors/failed" in calls and n_writes > 10
    for k in range(n_writes):
        path = tmp_path / f"kill{k}.h5"
        shutil.copy(template, path)
        count = iter(range(n_writes))

        def killing(ds, rows, data):
            if next(count) == k:
                raise _Killed(ds.name)
            real_write(ds, rows, data)

        monkeypatch.setattr(writer_mod, "write_rows", killing)
        with pytest.raises(_Killed):
            rewrite(path)  # the with block closes the file, as the OS would after a kill
        done, failed = _flags(path, 1)
        assert not (failed and any(done)), (k, calls[k], done, failed)
        with h5py.File(path, "r", locking=False) as f:
            for ci, c in enumerate(CONDS):
                if done[ci]:
                    np.testing.assert_array_equal(
                        f[f"conditions/{c.name}/image_attention"][1].astype(np.float32),
                        gen(1, ci).image_attention)


def test_durable_uncommit_is_fsynced_before_the_rewrite(tmp_path, monkeypatch):
    """With ``durable=True`` the cleared done/failed flags reach the disk (fsync) before any
    data of a rewrite or a failure's ``failed`` flag: a power loss cannot leave ``done``
    over partly written rows. Without ``durable`` nothing is fsynced per batch."""
    path = tmp_path / "run.h5"
    with open_writer(path, 4) as w:
        write_rows(w, [0, 1, 2])
        w.write_failure(3, "cannot open image 3")
    events: list[str] = []
    real_set, real_fsync = h5py.Dataset.__setitem__, os.fsync

    def set_spy(ds, sel, value):
        events.append(ds.name)
        real_set(ds, sel, value)

    def fsync_spy(fd):
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", set_spy)
    monkeypatch.setattr(os, "fsync", fsync_spy)

    def batch(w: CaptureWriter, rows) -> None:
        w.write_batch(rows, [{c.name: gen(r, ci) for ci, c in enumerate(CONDS)} for r in rows],
                      [{c.name: gold_correct(r, ci) for ci, c in enumerate(CONDS)} for r in rows])

    flags = {f"/conditions/{c.name}/done" for c in CONDS} | {"/errors/failed"}
    for durable in (True, False):
        with open_writer(path, 4, durable=durable) as w:
            for rewrite, before, after in (
                    (lambda: batch(w, [0]), flags, "/conditions/baseline/image_attention"),
                    (lambda: batch(w, [3]), flags, "/conditions/baseline/image_attention"),
                    (lambda: w.write_failure(1, "gone"), flags - {"/errors/failed"}
                     | {"/errors/reason"}, "/errors/failed")):
                events.clear()
                rewrite()
                if not durable:
                    assert "fsync" not in events
                    continue
                first_fsync = events.index("fsync")
                # before the first fsync only the flags are cleared (and a failure's reason
                # written); the data (or the failed flag) come after it
                assert events[:first_fsync] and set(events[:first_fsync]) <= before, events
                assert after in events[first_fsync:], events
    with h5py.File(path, "r", locking=False) as f:
        done = np.stack([f[f"conditions/{c.name}/done"][()] for c in CONDS])
        failed = f["errors/failed"][()]
    np.testing.assert_array_equal(done.all(axis=0), [True, False, True, True])
    np.testing.assert_array_equal(failed, [False, True, False, False])


@pytest.mark.parametrize("name", ["conditions/baseline/confidence", "conditions/scaling-0.5/correct",
                                  "samples/index", "errors/failed", "samples/width",
                                  "boxes/score"])
def test_merge_names_the_corrupted_shard(tmp_path, name):
    """A damaged chunk in a shard is one line naming that shard (not the output) and what
    could not be read; no output, ``.tmp`` or lock is left."""
    out = tmp_path / "run.h5"
    shards = [_shard(tmp_path, out, i, 2, 8) for i in range(2)]
    with h5py.File(shards[1], "r") as f:
        assert f[name].compression == "gzip"  # the damage is seen when the chunk is inflated
    _corrupt_chunk(shards[1], name, 0)
    with pytest.raises(VislensError) as exc:
        merge(out, shards)
    msg = one_line(exc)
    assert msg.startswith(f"{shards[1]}: cannot read ") and "corrupted" in msg, msg
    assert not out.exists() and not Path(f"{out}.tmp").exists() and not Path(f"{out}.lock").exists()


def test_merge_verifies_the_attention_chunks_it_copies(tmp_path):
    """Merge copies a final shard's compressed attention chunks byte for byte; a damaged one
    is refused then (one line naming the shard, condition and row), not at a later read, and
    no merged file is written (an existing one, with --force, stays as it was)."""
    out = tmp_path / "run.h5"
    shards = [_shard(tmp_path, out, i, 2, 8) for i in range(2)]
    name = "conditions/scaling-0.5/image_attention"
    with h5py.File(shards[1], "r") as f:
        assert f[name].compression == "gzip" and f[name].chunks == (1,) + f[name].shape[1:]
        row = int(np.flatnonzero(f["conditions/scaling-0.5/done"][()])[-1])  # a done row
    _corrupt_chunk(shards[1], name, row)
    with h5py.File(shards[1], "r") as f:  # the damage shows only when the chunk is inflated
        with pytest.raises(OSError):
            f[name][row]
    with pytest.raises(VislensError) as exc:
        merge(out, shards)
    msg = one_line(exc)
    assert msg.startswith(f"{shards[1]}: cannot read condition 'scaling-0.5' (image_attention), "
                          f"row {row}: the stored data is corrupted"), msg
    assert not out.exists() and not Path(f"{out}.tmp").exists() and not Path(f"{out}.lock").exists()
    out.write_bytes(b"an earlier merge")
    with pytest.raises(VislensError, match=rf"^{re.escape(str(shards[1]))}: cannot read"):
        merge(out, shards, force=True)
    assert out.read_bytes() == b"an earlier merge"


def test_merge_refuses_mixed_shard_counts(tmp_path):
    """Shards of different ``--shard I/N`` counts are not one job's shards: refused in one
    line naming both files, even when they happen to cover every sample."""
    out = tmp_path / "run.h5"
    half = _shard(tmp_path, out, 0, 2, 8)  # dataset positions 0, 2, 4, 6
    quarters = [_shard(tmp_path, out, i, 4, 8) for i in (1, 3)]  # 1, 5 and 3, 7
    for shards in ([half, quarters[0]], [half, *quarters], [quarters[1], half]):
        with pytest.raises(VislensError) as exc:
            merge(out, shards)
        msg = one_line(exc)
        assert msg.startswith(f"{shards[1]}: merge: ") and str(shards[0]) in msg, msg
        assert re.search(r"shard \d/4 .* \d/2|shard \d/2 .* \d/4", msg), msg
        assert not out.exists()
    zero4 = _shard(tmp_path, tmp_path / "other.h5", 0, 4, 8)  # 0/2 and 0/4: counts, not "twice"
    with pytest.raises(VislensError, match="0/4 but 0/2"):
        merge(out, [half, zero4])
