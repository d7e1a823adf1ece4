"""Capture and sweep on a Ray cluster (vislens.distributed), against single-process runs.

One local Ray cluster (started with vislens's own ``--ray local`` code) and one pool of two
organism workers serve the whole module, to keep the Ray start-up cost (tens of seconds on
a busy 2-core machine) paid once.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from vislens.capture import run_capture  # noqa: E402
from vislens.distributed import ReplicaPool, check_ray_options, start_local_cluster  # noqa: E402
from vislens.errors import VislensError  # noqa: E402
from vislens.store import open_capture  # noqa: E402

CONDS = ["baseline", "scaling:alpha=0.5", "adaptvis:alpha1=0.5,alpha2=2,beta=0.5"]
F16_STEP = 2.0 ** -10  # one float16 step, relative (the batch-composition noise of shards)


@pytest.fixture(scope="module")
def cluster():
    c = start_local_cluster(num_cpus=4)  # logical CPUs: 2 pool workers + 2 of a CLI job
    yield c
    c.close()


POOL_LOG: list[str] = []


@pytest.fixture(scope="module")
def pool(cluster):
    p = ReplicaPool("organism", workers=2, device="cpu", log=POOL_LOG.append)
    yield p
    p.close()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vislens.synth import generate_groups, write_scenes

    out = tmp_path_factory.mktemp("scenes")
    return write_scenes(generate_groups(5, "a", seed=3), out, name="a.jsonl")  # 20 samples


def _args(scenes, out, **kw):
    args = dict(model="organism", dataset=f"jsonl:{scenes}", out=out, conditions=CONDS,
                batch_size=3, max_new_tokens=3, device="cpu", progress=False,
                log=lambda m: None)
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory):
    """The same job in this process, no Ray."""
    return run_capture(**_args(scenes, tmp_path_factory.mktemp("ref") / "one.h5")).path


def assert_same_capture(path, ref):
    """Predictions, correctness and option sets equal; floats within one float16 step."""
    with open_capture(path) as a, open_capture(ref) as b:
        assert a.complete and b.complete
        ta, tb = a.table(), b.table()
        assert len(ta) == len(tb) == len(b) * len(CONDS)
        for col in ("id", "condition", "prediction", "correct"):
            assert list(ta[col]) == list(tb[col]), col
        assert list(a.samples["options"]) == list(b.samples["options"])
        np.testing.assert_array_equal(a.views(), b.views())  # what the model sees, per sample
        if b.box_mask() is not None:
            np.testing.assert_array_equal(a.box_mask(), b.box_mask())
        for c in b.conditions:
            np.testing.assert_allclose(a.attention(c), b.attention(c), rtol=F16_STEP,
                                       atol=2.0 ** -24)
            for x, y in zip(a.masses(c), b.masses(c)):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
            for x, y in zip(a.image_logits(c), b.image_logits(c)):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
        with h5py.File(path, "r", locking=False) as fa, h5py.File(ref, "r", locking=False) as fb:
            for c in b.conditions:
                np.testing.assert_allclose(fa[f"conditions/{c}/option_probs"][()],
                                           fb[f"conditions/{c}/option_probs"][()], rtol=1e-4,
                                           atol=1e-7)


def test_ray_capture_equals_one_process_and_records_provenance(pool, scenes, reference,
                                                               tmp_path):
    out = tmp_path / "ray.h5"
    summary = run_capture(**_args(scenes, out, model=pool))
    assert summary.complete and summary.n_written == 20 and summary.n_failed == 0
    assert_same_capture(summary.path, reference)
    stats = summary.ray.stats
    assert sum(s.samples for s in stats.values()) == 20  # each sample computed once
    assert all(s.batches >= 1 for s in stats.values())  # both workers took batches
    host = socket.gethostname()
    for i, st in stats.items():  # per-worker throughput in the log
        assert any(re.fullmatch(rf"worker {i} on {re.escape(host)} \(pid {st.pid}\): "
                                rf"{st.samples} sample\(s\) in {st.batches} batch\(es\), "
                                r"[0-9.]+ samples/s while busy", line) for line in POOL_LOG)
    with h5py.File(out, "r", locking=False) as f:
        assert int(f.attrs["workers"]) == 2
        assert f.attrs["ray_version"] == ray.__version__
        assert [h.decode() if isinstance(h, bytes) else h for h in f.attrs["hosts"]] \
            == [socket.gethostname()]


def test_the_pool_formats_prompts_as_its_model_does(pool):
    """--prompt-style paper asks the pool how its model runs a prompt (a verbatim check)."""
    from vislens.models import load_model

    local = load_model("organism", device="cpu")
    prompts = ["<image>\nUSER: Where is the cube? ASSISTANT:", "Where is the cube?"]
    got = pool.format_prompts(prompts)
    assert got == [local.format_prompt(p) for p in prompts]
    assert got[0] == prompts[0] and got[1] != prompts[1]  # verbatim / wrapped in the template


def test_a_worker_killed_mid_job_has_its_batch_retried(pool, scenes, reference, tmp_path):
    """SIGKILL one worker after its first batch: the batch it is sent next goes to the other
    worker, a replacement starts, and every sample is written exactly once."""
    seen: list[list[int]] = []
    killed: list[int] = []
    original = pool.imap_unordered

    def killing(jobs):
        for job, out in original(jobs):
            seen.append(list(out.rows))
            if not killed:
                pid = pool.slots[out.worker].pid
                os.kill(pid, signal.SIGKILL)
                killed.append(out.worker)
            yield job, out

    events: list[tuple[str, object]] = []  # the dead worker's handle is killed before a new one starts
    real_kill, real_spawn = ray.kill, pool._spawn

    def recording_kill(actor, *a, **kw):
        events.append(("kill", actor))
        return real_kill(actor, *a, **kw)

    def recording_spawn(slot):
        events.append(("spawn", slot.actor))
        return real_spawn(slot)

    pool.imap_unordered = killing
    pool._spawn = recording_spawn
    ray.kill = recording_kill
    try:
        deaths0 = sum(s.deaths for s in pool.summary.stats.values())
        summary = run_capture(**_args(scenes, tmp_path / "kill.h5", model=pool))
    finally:
        del pool.imap_unordered, pool._spawn
        ray.kill = real_kill
    assert killed
    assert [e for e, _ in events][:2] == ["kill", "spawn"] and events[0][1] is not None
    assert sum(s.deaths for s in pool.summary.stats.values()) == deaths0 + 1
    assert pool.summary.retried >= 1
    rows = sorted(r for batch in seen for r in batch)
    assert rows == list(range(20))  # none lost, none written twice
    assert summary.complete and summary.n_written == 20
    assert_same_capture(summary.path, reference)


def test_killed_driver_leaves_a_file_the_same_command_resumes(cluster, pool, scenes, reference,
                                                             tmp_path):
    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "driver.h5"
    cmd = [sys.executable, "-m", "vislens", "capture", "--model", "organism", "--dataset",
           f"jsonl:{scenes}", "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3",
           "--device", "cpu", "--quiet", "--ray", address, "--workers", "1"]
    for c in CONDS:
        cmd += ["--condition", c]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def rows_done() -> int:  # done in every condition (a commit sets them one by one)
        with h5py.File(out, "r", locking=False) as f:
            return int(np.logical_and.reduce([f[f"conditions/{c}/done"][()]
                                              for c in f["conditions"]]).sum())

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if out.exists() and 0 < rows_done() < 20:
                break
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with h5py.File(out, "r", locking=False) as f:
        assert not f.attrs["complete"]
    assert 0 < rows_done() < 20
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout + res.stderr
    assert_same_capture(out, reference)


def test_ray_sweep_equals_one_process(pool, scenes, tmp_path):
    from vislens.sweep import run_sweep

    kw = dict(dataset=f"jsonl:{scenes}", alphas="0.5,2", alpha1="0.5", alpha2="2",
              betas="0.3,0.6", batch_size=4, max_new_tokens=3, device="cpu", progress=False,
              matcher="first-word", log=lambda m: None)
    a = run_sweep(model=pool, out=tmp_path / "ray", **kw)
    b = run_sweep(model="organism", out=tmp_path / "one", **kw)
    assert (a.val.predictions == b.val.predictions).all()
    assert (a.val.correct == b.val.correct).all()
    np.testing.assert_allclose(a.val.confidence, b.val.confidence, rtol=1e-4)
    assert a.chosen["scalingvis"] == b.chosen["scalingvis"]
    assert a.chosen["adaptvis"] == b.chosen["adaptvis"]
    assert a.table1.equals(b.table1)


def test_a_worker_that_cannot_load_the_model_is_one_line_naming_its_host(cluster, tmp_path):
    with pytest.raises(VislensError) as err:
        ReplicaPool(str(tmp_path / "no-such-model"), workers=1, device="cpu",
                    log=lambda m: None)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"worker 0 on {socket.gethostname()} cannot load model" in msg
    assert "no-such-model" in msg


def test_more_workers_than_the_cluster_can_ever_hold_is_refused(cluster):
    with pytest.raises(VislensError, match=r"--workers 99 .* needs 99 CPU .* has 4 CPU"):
        ReplicaPool("organism", workers=99, device="cpu", log=lambda m: None)


@pytest.mark.parametrize("kw, pattern", [
    (dict(ray="local", workers=0), r"--workers 0: must be >= 1"),
    (dict(ray="local", workers=2, shard="0/2"), r"--ray and --shard do not combine"),
    (dict(workers=2), r"--workers needs --ray"),
    (dict(gpus_per_worker=1.0), r"--gpus-per-worker needs --ray"),
    (dict(ray="somewhere"), r"--ray 'somewhere': choose local, auto or a cluster address"),
    (dict(ray="local", gpus_per_worker=-1.0), r"--gpus-per-worker -1.0: must be >= 0"),
])
def test_bad_ray_options_are_one_line(kw, pattern):
    args = dict(ray=None, workers=None, gpus_per_worker=None, shard=None)
    args.update(kw)
    with pytest.raises(VislensError, match=pattern):
        check_ray_options(args["ray"], args["workers"], args["gpus_per_worker"], args["shard"])


def test_cli_no_cluster_at_the_address_is_one_line_and_writes_nothing(scenes, tmp_path,
                                                                      capsys):
    from vislens.cli import main

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    out = tmp_path / "x.h5"
    code = main(["capture", "--model", "organism", "--dataset", f"jsonl:{scenes}", "--out",
                 str(out), "--device", "cpu", "--quiet", "--ray", f"127.0.0.1:{port}",
                 "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"vislens: error: --ray 127.0.0.1:{port}: no Ray cluster at")
    assert not out.exists() and not list(tmp_path.glob("x.h5*"))


def test_workers_that_loaded_other_weights_or_dtype_are_refused(monkeypatch):
    """Every replica must be the same model: a worker whose node resolved another revision
    of the weights (its own hub cache) or another dtype would mix two models' rows in one
    file whose attrs name only the first; it is refused in one line naming the field."""
    from vislens.distributed import PoolSummary, WorkerStats, _Slot

    def info(host, **changes):
        describe = {"model": "m", "family": "llava", "model_revision": "aaa", "num_layers": 2,
                    "num_heads": 4, "dtype": "bfloat16", "device": "cuda:0", **changes}
        return {"host": host, "pid": 1, "error": "", "vislens_version": __import__(
            "vislens").__version__, "describe": describe, "num_layers": 2, "num_heads": 4,
            "name": "m"}

    def started(*infos):
        pool = ReplicaPool.__new__(ReplicaPool)  # no cluster: only the start-up check
        pool.model, pool.info, pool.log = "m", {}, lambda m: None
        pool.slots = [_Slot(i) for i in range(len(infos))]
        pool.summary = PoolSummary({i: WorkerStats() for i in range(len(infos))})
        refs = {f"ref{i}": x for i, x in enumerate(infos)}
        pool._starting = {f"ref{i}": s for i, s in enumerate(pool.slots)}
        monkeypatch.setattr(ray, "get", refs.__getitem__)
        for ref in list(refs):
            pool._on_started(ref)
        return pool

    # another device name is fine (each worker resolves --device on its own GPU)
    ok = started(info("a"), info("b", device="cuda:1"))
    assert all(s.ready for s in ok.slots)
    for key, value in (("model_revision", "bbb"), ("dtype", "float32")):
        with pytest.raises(VislensError) as err:
            started(info("a"), info("b", **{key: value}))
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("worker 1 on b ")
        assert key in msg and repr(value) in msg and repr(info("a")["describe"][key]) in msg


def test_asking_a_pool_without_a_ready_worker_is_one_line():
    """Every worker gone (replacements spent): a question to the pool is a VislensError, not
    a StopIteration out of the slot search."""
    from vislens.distributed import ReplicaPool, _Slot
    from vislens.errors import VislensError

    pool = object.__new__(ReplicaPool)
    pool.slots = [_Slot(0), _Slot(1, actor=object(), ready=False)]
    for ask in (lambda: pool.format_prompts(["q"]), lambda: pool.image_views([(4, 4)])):
        with pytest.raises(VislensError, match="no Ray worker is ready"):
            ask()
