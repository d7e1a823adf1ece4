"""Capture and sweep on a Ray cluster: one model replica per worker, batches to whichever is free.

The driver (the ``vislens`` process) keeps everything that touches the output: it plans the
job, reads each batch's image files, and writes every result through the one crash-safe
:class:`~vislens.store.CaptureWriter` (the commit protocol of ``docs/capture-format.md``).
Workers are Ray actors that load the model once and run :class:`~vislens.decoding.DecodingEngine`
on the batches they are sent; they never open the output. Why actors and a single writer
(not Ray Data, not per-worker shards) is measured and explained in ``docs/scale.md``.

Fault tolerance: a batch is written only when its worker returned it, so a worker that dies
(``SIGKILL``, OOM, a lost node) loses nothing: its batch goes back to the queue, the other
workers take it, and a replacement worker is started in the background. Killing the driver
leaves the working file, which the same command resumes.

This module imports Ray only inside functions: ``import vislens`` never needs it.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import __version__
from .data.base import IMAGE_FORMATS
from .errors import VislensError

Log = Callable[[str], None]

#: ``--ray`` values that are not an address
RAY_TARGETS = ("local", "auto")
#: how often one batch may take a worker down with it before the job stops
MAX_BATCH_ATTEMPTS = 3
#: replacement workers started per worker slot over a job
MAX_REPLACEMENTS = 3
#: attempts to start a ``--ray local`` cluster (start-up races the raylet's fixed 15 s wait)
LOCAL_START_ATTEMPTS = 3


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first or type(exc).__name__


def check_ray_options(ray: str | None, workers: int | None, gpus_per_worker: float | None,
                      shard: str | None = None) -> None:
    """One-line errors for ``--ray`` / ``--workers`` / ``--gpus-per-worker`` / ``--shard``."""
    if ray is None:
        for flag, value in (("--workers", workers), ("--gpus-per-worker", gpus_per_worker)):
            if value is not None:
                raise VislensError(f"{flag} needs --ray (local, auto or a cluster address)")
        return
    if not isinstance(ray, str) or not ray.strip():
        raise VislensError(f"--ray {ray!r}: choose local, auto or a cluster address HOST:PORT")
    if ray not in RAY_TARGETS and not ray.startswith("ray://"):
        host, sep, port = ray.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise VislensError(f"--ray {ray!r}: choose local, auto or a cluster address "
                               "HOST:PORT (e.g. 10.0.0.1:6379)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise VislensError(f"--workers {workers}: must be >= 1")
    if gpus_per_worker is not None and not (gpus_per_worker >= 0):
        raise VislensError(f"--gpus-per-worker {gpus_per_worker}: must be >= 0")
    if shard is not None:
        raise VislensError("--ray and --shard do not combine: Ray already spreads one job over "
                           "its workers into one file; use --ray, or --shard with vislens merge")


# ----------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    """A connection to a Ray cluster; ``owned`` when vislens started it (``--ray local``)."""

    target: str
    owned: bool
    temp_dir: Path | None = None
    connected_here: bool = True  # False when the process was already connected (reused)

    def close(self) -> None:
        """Disconnect; a cluster vislens started is shut down and its temp dir removed."""
        import ray

        if self.connected_here and ray.is_initialized():
            ray.shutdown()
        if self.owned and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise VislensError("--ray needs Ray: pip install 'vislens[ray]'") from None
    return ray


def _stub_dir(temp_dir: Path) -> Path:
    """A path entry that hides ``rfc3987_syntax`` from the Ray processes of a local cluster.

    ``jsonschema`` (imported by ``import ray``) builds that package's Earley grammar at import
    time: 2.5 s of CPU in every Ray process when it is installed (jupyter pulls it in). On a
    busy machine this pushes the dashboard agent past the raylet's fixed 15 s wait for its
    port file and the cluster aborts. Ray only validates runtime-env schemas with jsonschema
    and never needs the IRI format check that package provides.
    """
    stub = temp_dir / "pystub"
    pkg = stub / "rfc3987_syntax"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        'raise ImportError("rfc3987_syntax is hidden from Ray processes started by vislens '
        '(see vislens.distributed)")\n')
    return stub


def start_local_cluster(*, num_cpus: int | None = None, num_gpus: int | None = None,
                        attempts: int = LOCAL_START_ATTEMPTS, log: Log = print) -> Cluster:
    """Start a Ray cluster on this machine for one job (``--ray local``) and connect to it.

    No dashboard; the Ray processes get their own temp dir and do not import
    ``rfc3987_syntax`` (see :func:`_stub_dir`). Start-up is retried ``attempts`` times,
    since on a loaded machine the raylet may still give up on its agents.
    """
    ray = _import_ray()
    import logging

    if ray.is_initialized():
        raise VislensError("--ray local: this process is already connected to a Ray cluster; "
                           "use --ray auto to run on it")
    temp_dir = Path(tempfile.mkdtemp(prefix="vislens-ray-"))
    stub = str(_stub_dir(temp_dir))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = stub + (os.pathsep + old if old else "")
    last: BaseException | None = None
    try:
        for attempt in range(1, attempts + 1):
            try:
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                         include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, _temp_dir=str(temp_dir))
                return Cluster("local", owned=True, temp_dir=temp_dir)
            except Exception as exc:  # Ray raises plain Exception when the raylet aborts
                last = exc
                ray.shutdown()
                if attempt < attempts:
                    log(f"--ray local: start-up attempt {attempt} failed ({_one_line(exc)}); "
                        "retrying")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    raise VislensError(f"--ray local: Ray did not start after {attempts} attempts "
                       f"({_one_line(last) if last else 'unknown reason'}); logs in {temp_dir}")


def connect(target: str, *, num_cpus: int | None = None, log: Log = print) -> Cluster:
    """Connect to ``target``: ``local`` starts a cluster, ``auto``/``HOST:PORT`` join one.

    A process that is already connected (e.g. a notebook that called ``ray.init``) keeps
    its connection for ``auto`` and addresses, and it is left open afterwards.
    """
    ray = _import_ray()
    if target == "local":
        return start_local_cluster(num_cpus=num_cpus, log=log)
    if target not in RAY_TARGETS and not target.startswith("ray://"):
        host, _, port = target.rpartition(":")
        try:  # fail in seconds, not after Ray's minute of GCS retries
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise VislensError(f"--ray {target}: no Ray cluster at {target} "
                               f"({exc.strerror or _one_line(exc)})") from None
    if ray.is_initialized():
        return Cluster(target, owned=False, connected_here=False)
    import logging

    try:
        ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError...
        where = "no running Ray cluster found" if target == "auto" \
            else f"no Ray cluster at {target}"
        raise VislensError(f"--ray {target}: {where} ({_one_line(exc)})") from None
    return Cluster(target, owned=False)


# ----------------------------------------------------------------------------- worker side


@dataclass
class BatchJob:
    """One engine run for a worker: image file bytes and prompts of ``rows``."""

    rows: list[int]
    keys: list[str]  # sample ids (the engine's per-sample noise seeds)
    paths: list[str]  # image paths, for error messages
    images: list[bytes]
    questions: list[str]
    options: list[list[str]]
    conditions: list[Any]  # vislens.decoding.Condition
    engine: dict[str, Any]  # DecodingEngine keyword arguments
    attempts: int = 0


@dataclass
class BatchOutput:
    """What a worker returns for a :class:`BatchJob`."""

    rows: list[int]  # rows answered, in order of ``results``
    results: list[dict[str, Any]]  # one {condition name: ConditionResult} per row
    sizes: list[tuple[int, int]]  # original image size per answered row
    failures: list[tuple[int, str]]  # (row, one-line reason): undecodable or refused samples
    seconds: float = 0.0
    worker: int = -1
    host: str = ""


def decode_image(data: bytes, path: str, sample_id: str):
    """RGB PIL image from file bytes; a corrupt file is one line naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types
        raise VislensError(f"{path}: cannot decode image (sample {sample_id}): "
                           f"{_one_line(exc)}") from None


class Replica:
    """A Ray actor holding one model replica (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, model: str, dtype: str, device: str) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.error = ""
        self.adapter = None
        self.engines: dict[tuple, Any] = {}
        try:
            from .models import load_model

            self.adapter = load_model(model, dtype=dtype, device=device)
        except BaseException as exc:  # reported by info(), one line, with the host
            self.error = f"{type(exc).__name__}: {_one_line(exc)}" \
                if not isinstance(exc, VislensError) else _one_line(exc)

    def info(self) -> dict[str, Any]:
        """Host, pid, vislens version and the model's description (or the load error)."""
        out: dict[str, Any] = {"host": self.host, "pid": self.pid, "error": self.error,
                               "vislens_version": __version__}
        if self.adapter is not None:
            out.update(describe=self.adapter.describe(), num_layers=self.adapter.num_layers,
                       num_heads=self.adapter.num_heads, name=getattr(self.adapter, "name", ""))
        return out

    def image_views(self, sizes: list[tuple[int, int]]) -> list[tuple[float, float, float, float]]:
        """The part of each image size the model sees (``adapter.image_view``), normalised."""
        return [tuple(float(v) for v in self.adapter.image_view(tuple(size))) for size in sizes]

    def format_prompts(self, prompts: list[str]) -> list[str]:
        """Each prompt as the model runs it (``adapter.format_prompt``)."""
        return [self.adapter.format_prompt(p) for p in prompts]

    def run(self, job: BatchJob) -> BatchOutput:
        """Decode the images and run the engine on the batch."""
        import torch

        from .decoding import DecodingEngine, run_leaving_out

        t0 = time.perf_counter()
        kw = dict(job.engine)
        if "attention_dtype" in kw:
            kw["attention_dtype"] = getattr(torch, kw["attention_dtype"])
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in self.engines:
            self.engines[key] = DecodingEngine(self.adapter, **kw)
        engine = self.engines[key]
        ok, images, failures = [], [], []
        for i, (data, path, sid) in enumerate(zip(job.images, job.paths, job.keys)):
            try:
                images.append(decode_image(data, path, sid))
                ok.append(i)
            except VislensError as exc:
                failures.append((job.rows[i], str(exc)))
        results: list = []
        if ok:  # samples the engine refuses are failures too, their batch-mates still run
            kept, results = run_leaving_out(
                engine, images, [job.questions[i] for i in ok], [job.options[i] for i in ok],
                job.conditions, [job.keys[i] for i in ok],
                lambda k, reason: failures.append((job.rows[ok[k]], reason)))
            ok, images = [ok[k] for k in kept], [images[k] for k in kept]
        return BatchOutput([job.rows[i] for i in ok], results, [im.size for im in images],
                           failures, time.perf_counter() - t0, host=self.host)


# ----------------------------------------------------------------------------- driver side


@dataclass
class WorkerStats:
    """Throughput of one worker slot (over its replacements)."""

    host: str = ""
    pid: int = 0
    batches: int = 0
    samples: int = 0
    busy_s: float = 0.0
    deaths: int = 0

    def line(self, index: int) -> str:
        rate = self.samples / self.busy_s if self.busy_s > 0 else float("nan")
        return (f"worker {index} on {self.host} (pid {self.pid}): {self.samples} sample(s) in "
                f"{self.batches} batch(es), {rate:.2f} samples/s while busy"
                + (f", {self.deaths} death(s)" if self.deaths else ""))


@dataclass
class _Slot:
    index: int
    actor: Any = None
    host: str = ""
    pid: int = 0
    replacements: int = 0
    ready: bool = False


@dataclass
class PoolSummary:
    """What the pool did: per-worker stats, hosts that returned batches, batches retried."""

    stats: dict[int, WorkerStats] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    retried: int = 0


class ReplicaPool:
    """``workers`` Ray actors, each holding one replica of ``model``.

    Looks like an adapter to the capture code (:meth:`describe`, ``num_layers``,
    ``num_heads``, ``name``) and runs batches with :meth:`imap_unordered`.
    """

    def __init__(self, model: str, *, workers: int = 1, gpus_per_worker: float | None = None,
                 dtype: str = "auto", device: str = "auto", log: Log = print) -> None:
        ray = _import_ray()
        if not isinstance(model, (str, Path)):
            raise VislensError("--ray needs a model name or path (each worker loads its own "
                               "replica), not a loaded adapter")
        if workers < 1:
            raise VislensError(f"--workers {workers}: must be >= 1")
        if Path(model).exists():  # a local checkpoint: the same absolute path on every node
            model = Path(model).resolve()
        self.model, self.dtype, self.device, self.log = str(model), dtype, device, log
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        self.gpus_per_worker = float(gpus_per_worker)
        need_cpu, need_gpu = float(workers), workers * self.gpus_per_worker
        if need_cpu > cpus or need_gpu > gpus + 1e-9:  # never schedulable: refuse now
            raise VislensError(
                f"--workers {workers} x (1 CPU, {self.gpus_per_worker:g} GPU) needs "
                f"{need_cpu:g} CPU and {need_gpu:g} GPU but the Ray cluster has {cpus:g} CPU "
                f"and {gpus:g} GPU")
        # busy resources are waited for: another job's workers may be finishing
        self._remote = ray.remote(Replica).options(
            num_cpus=1, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0)
        self.slots = [_Slot(i) for i in range(workers)]
        self.summary = PoolSummary({i: WorkerStats() for i in range(workers)})
        self.info: dict[str, Any] = {}
        self._starting: dict[Any, _Slot] = {}
        for slot in self.slots:
            self._spawn(slot)
        self._wait_ready()

    # ---------------------------------------------------------------- adapter look-alike

    @property
    def num_layers(self) -> int:
        return int(self.info["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.info["num_heads"])

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.model)

    def _ask(self, method: str, *args: Any) -> Any:
        """``Replica.method(*args)`` on one ready worker, in one call (every replica has the
        same model and processor)."""
        import ray

        slot = next((s for s in self.slots if s.ready and s.actor is not None), None)
        if slot is None:
            raise VislensError("no Ray worker is ready (see the lines above); run the same "
                               "command again to resume")
        return ray.get(getattr(slot.actor, method).remote(*args))

    def image_views(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """``[len(sizes), 4]``: what the model sees of each image size."""
        views = self._ask("image_views", [tuple(map(int, z)) for z in sizes])
        return np.asarray(views, dtype=np.float32).reshape(len(sizes), 4)

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as the workers' model runs it."""
        return list(self._ask("format_prompts", list(prompts)))

    def describe(self) -> dict[str, Any]:
        """The model's description as a worker reports it, plus Ray provenance."""
        import ray

        hosts = sorted({s.host for s in self.slots if s.host})
        return {**self.info["describe"], "workers": len(self.slots),
                "ray_version": ray.__version__, "hosts": hosts}

    @property
    def workers(self) -> int:
        return len(self.slots)

    # ---------------------------------------------------------------- workers

    def _spawn(self, slot: _Slot) -> None:
        slot.actor = self._remote.remote(self.model, self.dtype, self.device)
        slot.ready = False
        self._starting[slot.actor.info.remote()] = slot

    def _on_started(self, ref: Any) -> bool:
        """Handle a finished ``info`` call; False when the worker cannot serve."""
        import ray

        slot = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except Exception as exc:
            self.log(f"worker {slot.index} did not start: {_one_line(exc)}")
            slot.actor = None
            return False
        slot.host, slot.pid = info["host"], info["pid"]
        if info["error"]:
            raise VislensError(f"worker {slot.index} on {slot.host} cannot load model "
                               f"{self.model!r}: {info['error']}")
        if info["vislens_version"] != __version__:
            raise VislensError(f"worker {slot.index} on {slot.host} runs vislens "
                               f"{info['vislens_version']}, this driver {__version__}: install "
                               "the same version on every node")
        if self.info and (info["num_layers"], info["num_heads"]) != (self.num_layers,
                                                                      self.num_heads):
            raise VislensError(f"worker {slot.index} on {slot.host} loaded a model with "
                               f"{info['num_layers']} layers x {info['num_heads']} heads, "
                               f"others {self.num_layers} x {self.num_heads}")
        if self.info:  # one file, one model: the same weights (revision) and dtype everywhere
            mine, first = info["describe"], self.info["describe"]
            for key in sorted((set(mine) | set(first)) - {"device"}):
                if mine.get(key) != first.get(key):
                    raise VislensError(
                        f"worker {slot.index} on {slot.host} loaded {self.model!r} with {key} "
                        f"{mine.get(key)!r}, the other workers {first.get(key)!r}: every "
                        "worker must load the same weights in the same dtype (the same model "
                        "revision on every node)")
        self.info = self.info or info
        slot.ready = True
        st = self.summary.stats[slot.index]
        st.host, st.pid = slot.host, slot.pid
        return True

    def _wait_ready(self) -> None:
        import ray

        t0, last = time.perf_counter(), 0.0
        while self._starting:
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=10)
            for ref in done:
                try:
                    self._on_started(ref)
                except BaseException:
                    self.close()
                    raise
            waited = time.perf_counter() - t0
            if not done and waited - last >= 60:
                last = waited
                n_ready = sum(s.ready for s in self.slots)
                self.log(f"waiting for workers: {n_ready} of {len(self.slots)} ready after "
                         f"{waited:.0f} s (loading the model; pending Ray resources?)")
        if not any(s.ready for s in self.slots):
            self.close()
            raise VislensError("no Ray worker started (see the lines above)")
        for s in self.slots:
            if s.ready:
                self.log(f"worker {s.index} on {s.host} (pid {s.pid}) ready")

    def _replace(self, slot: _Slot, why: str, job: BatchJob) -> None:
        st = self.summary.stats[slot.index]
        st.deaths += 1
        self.log(f"worker {slot.index} on {slot.host} (pid {slot.pid}) died ({why}); its "
                 f"batch of {len(job.rows)} sample(s) goes back to the queue")
        if slot.actor is not None:  # unreachable is not always dead: free its GPU first
            import ray

            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone
                pass
        slot.actor, slot.ready = None, False
        if slot.replacements < MAX_REPLACEMENTS:
            slot.replacements += 1
            self._spawn(slot)

    def imap_unordered(self, jobs: Iterable[BatchJob]) -> Iterator[tuple[BatchJob, BatchOutput]]:
        """Run ``jobs`` on whichever worker is free; yield ``(job, output)`` as they finish.

        A job whose worker dies is retried on another one (at most
        :data:`MAX_BATCH_ATTEMPTS` times); an exception raised by the engine stops the job
        with one line naming the worker's host.
        """
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        todo = iter(jobs)
        retry: deque[BatchJob] = deque()
        inflight: dict[Any, tuple[_Slot, BatchJob]] = {}
        exhausted = False
        while True:
            for slot in self.slots:
                if not slot.ready or any(s is slot for s, _ in inflight.values()):
                    continue
                if retry:
                    job = retry.popleft()
                elif not exhausted:
                    job = next(todo, None)
                    if job is None:
                        exhausted = True
                        continue
                else:
                    continue
                inflight[slot.actor.run.remote(job)] = (slot, job)
            if not inflight and not retry and exhausted:
                return
            if not inflight and not self._starting:
                raise VislensError("every Ray worker died (see the lines above); run the same "
                                   "command again to resume")
            done, _ = ray.wait(list(inflight) + list(self._starting), num_returns=1)
            ref = done[0]
            if ref in self._starting:
                self._on_started(ref)
                continue
            slot, job = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as exc:
                job.attempts += 1
                if job.attempts >= MAX_BATCH_ATTEMPTS:
                    raise VislensError(
                        f"samples at rows {job.rows[0]}..{job.rows[-1]} took down "
                        f"{job.attempts} workers (last: worker {slot.index} on {slot.host}: "
                        f"{_one_line(exc)})") from None
                self.summary.retried += 1
                retry.append(job)
                self._replace(slot, _one_line(exc), job)
                continue
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise VislensError(f"worker {slot.index} on {slot.host}: "
                                   f"{_one_line(cause)}") from None
            st = self.summary.stats[slot.index]
            st.batches += 1
            st.samples += len(out.rows) + len(out.failures)
            st.busy_s += out.seconds
            out.worker = slot.index
            if out.host not in self.summary.hosts:
                self.summary.hosts.append(out.host)
            yield job, out

    def log_throughput(self) -> None:
        """One line per worker: samples, batches, samples/s while busy."""
        for i, st in sorted(self.summary.stats.items()):
            if st.host:
                self.log(st.line(i))

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        import ray

        if not ray.is_initialized():
            return
        for slot in self.slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor)
                except Exception:  # already dead
                    pass
                slot.actor = None
        self._starting.clear()


def read_image_bytes(sample: Any) -> bytes:
    """The sample's image file as bytes; a missing or unreadable file is one line naming it."""
    if not sample.image_path:
        raise VislensError(f"sample {sample.id}: no image path")
    try:
        return Path(sample.image_path).read_bytes()
    except FileNotFoundError:
        raise VislensError(f"{sample.image_path}: image not found (sample {sample.id})") from None
    except OSError as exc:
        raise VislensError(f"{sample.image_path}: cannot read image (sample {sample.id}): "
                           f"{exc.strerror or _one_line(exc)}") from None


def make_jobs(samples: Sequence[Any], rows: Sequence[int], conditions: Sequence[Any], *,
              batch_size: int, engine: dict[str, Any], on_failure: Callable[[int, str], None],
              prompt_style: str = "chat") -> Iterator[BatchJob]:
    """Batches of ``samples[rows]`` with their image bytes, read lazily as workers free up.

    A missing image is reported as ``on_failure(row, reason)`` (which may raise) and left
    out of its batch.
    """
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        ok, data = [], []
        for r in rows[start:start + batch_size]:
            try:
                data.append(read_image_bytes(samples[r]))
                ok.append(r)
            except VislensError as exc:
                on_failure(r, str(exc))
        if ok:
            batch = [samples[r] for r in ok]
            yield BatchJob(ok, [s.id for s in batch], [str(s.image_path) for s in batch], data,
                           [s.meta["prompt"] if prompt_style == "paper" else s.question
                            for s in batch],
                           [list(s.options) for s in batch], list(conditions), dict(engine))


@dataclass
class RaySession:
    """A cluster connection plus a worker pool, closed together."""

    cluster: Cluster
    pool: ReplicaPool

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            self.cluster.close()

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_session(target: str, model: str, *, workers: int | None = None,
                 gpus_per_worker: float | None = None, dtype: str = "auto",
                 device: str = "auto", log: Log = print) -> RaySession:
    """Connect to ``target`` and start the workers; one line per failure."""
    check_ray_options(target, workers, gpus_per_worker)
    workers = 1 if workers is None else workers
    num_cpus = None
    if target == "local":  # enough CPUs for the workers on a small machine too
        num_cpus = max(os.cpu_count() or 1, workers)
    cluster = connect(target, num_cpus=num_cpus, log=log)
    try:
        pool = ReplicaPool(model, workers=workers, gpus_per_worker=gpus_per_worker,
                           dtype=dtype, device=device, log=log)
    except BaseException:
        cluster.close()
        raise
    return RaySession(cluster, pool)


__all__ = ["check_ray_options", "connect", "start_local_cluster", "Cluster", "ReplicaPool",
           "RaySession", "open_session", "BatchJob", "BatchOutput", "make_jobs", "decode_image",
           "read_image_bytes", "WorkerStats", "PoolSummary", "Replica", "RAY_TARGETS"]
