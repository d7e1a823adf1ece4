"""``vislens capture``: run decoding conditions over a benchmark into a resumable HDF5 file.

The job validates everything it can before touching the model or the output (conditions,
dataset, split, shard, images of the selected samples), then writes batch after batch through
:class:`vislens.store.CaptureWriter`, whose commit protocol makes a killed job resumable by
running the same command again.
"""
from __future__ import annotations

import datetime as _dt
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import __version__
from .data import IMAGE_FORMATS, Sample, assign_splits, load_dataset, select_split
from .conditions import Condition, ConditionResult, check_conditions, parse_condition
from .errors import VislensError
from .jobs import MATCHERS, check_job, check_memory, check_stop  # noqa: F401 (MATCHERS: public here too)
from .store import parse_shard

if TYPE_CHECKING:  # the engine imports torch: the CLI checks its arguments first
    from .decoding import DecodingEngine
    from .distributed import ReplicaPool


@dataclass
class CaptureSummary:
    """What a capture job did, for printing and for tests."""

    path: Path
    n_total: int
    n_written: int
    n_failed: int
    seconds: float
    accuracy: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    ray: Any = None  # vislens.distributed.PoolSummary of a --ray job (per-worker throughput)


def is_correct(prediction: str, sample: Sample, matcher: str = "paper") -> bool:
    """Answer matching: the paper's substring rule (VSR: its case-sensitive Yes/No) or strict first word."""
    from .evaluate import is_yes_no, match_first_word, match_paper, match_vsr_paper

    if matcher == "first-word":
        return match_first_word(prediction, sample.answer)
    if is_yes_no(sample.options):
        return match_vsr_paper(prediction, int(sample.answer.lower() == "yes"))
    return match_paper(prediction, sample.answer)


def check_options_in_prompt(samples: Sequence[Sample]) -> list[str]:
    """Samples whose options are not all offered by the question's "Answer with ..." clause.

    Raises for the first such sample unless the loader flagged it as a known quirk of the
    published data (``meta["answer_not_in_options"]``); returns the ids of flagged ones.
    """
    flagged = []
    for s in samples:
        q = " ".join(s.question.lower().split())
        if "answer with" not in q:
            continue
        offered = q.split("answer with", 1)[1]
        # whole words: "front" does not offer "on", nor "top" "to"
        missing = [o for o in s.options if not re.search(
            rf"(?<!\w){re.escape(' '.join(o.lower().split()))}(?!\w)", offered)]
        if missing:
            if s.meta.get("answer_not_in_options"):
                flagged.append(s.id)
                continue
            raise VislensError(f"sample {s.id}: option(s) {missing} are not offered by its prompt "
                               f"({s.question[-80:]!r})")
    return flagged


def select_samples(dataset: str, data_root: str | None, *, split: str = "all",
                   limit: int | None = None, split_seed: int = 0, val_fraction: float = 0.2
                   ) -> tuple[list[Sample], list[int]]:
    """Load, split and limit a dataset; returns samples and their indices in the split.

    Sharding is :func:`vislens.store.shard_rows` on the result (merge checks that the
    shards add up to this selection)."""
    if split not in ("val", "test", "all"):
        raise VislensError(f"--split {split!r}: choose val, test or all")
    if data_root and dataset.strip().startswith("jsonl:"):
        raise VislensError(f"--data-root {data_root}: not used by jsonl: datasets (their image "
                           "paths are relative to the JSONL file); leave it out")
    samples = load_dataset(dataset, data_root)
    if not samples:
        raise VislensError(f"dataset {dataset} has no samples")
    assign_splits(samples, val_fraction=val_fraction, seed=split_seed)
    chosen = select_split(samples, split)
    if not chosen:
        raise VislensError(f"dataset {dataset}: the {split} split of its {len(samples)} "
                           f"sample(s) is empty (val takes {val_fraction:.0%}, whole groups, of the "
                           "samples whose record names no split); "
                           "use more samples or --split all")
    if limit is not None:
        if limit < 1:
            raise VislensError(f"--limit {limit}: must be >= 1")
        chosen = chosen[:limit]
    return chosen, list(range(len(chosen)))


def open_image(sample: Sample):
    """The sample's image as RGB PIL; a missing or undecodable file is one line naming it."""
    from PIL import Image

    path = sample.image_path
    if not path:
        raise VislensError(f"sample {sample.id}: no image path")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise VislensError(f"{path}: image not found (sample {sample.id})") from None
    except Exception as exc:  # PIL raises many types; ultralytics' patched open adds more
        raise VislensError(f"{path}: cannot decode image (sample {sample.id}): "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


_open_image = open_image  # the former private name (tests and notebooks may still use it)


def _image_size(sample: Sample) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(sample.image_path, formats=IMAGE_FORMATS) as im:
            return im.size
    except Exception:
        return None


def annotation_masks(samples: Sequence[Sample], grid: int,
                     views: np.ndarray | None = None):
    """Box masks from the dataset's own boxes (synthetic scenes, JSONL), or None.

    Each mask covers the question objects' boxes, chosen by the rule of
    :func:`vislens.boxes.annotation_boxes` (label equal to the object name in any case, else a
    synonym), so it never includes a distractor and equals what ``vislens boxes`` attaches.

    ``views`` [N, 4] (normalised rectangles the model sees, :func:`sample_views`) restrict
    each mask to what the model saw; without them the whole image counts.
    """
    if not any(s.boxes for s in samples):
        return None, None, None
    from .boxes import Detection, annotation_objects, box_mask, check_box_pixels

    sizes, masks = [], np.zeros((len(samples), grid, grid), dtype=np.float32)
    for k, s in enumerate(samples):
        size = _image_size(s) or (0, 0)
        sizes.append(size)
        if s.boxes and size[0] > 0:
            for b in s.boxes:
                check_box_pixels(s.id, b.label, b.xyxy, size)
            # the question objects' boxes, chosen as `vislens boxes --detector annotations`
            # does (never a distractor); a sample that names no objects counts every box
            wanted = [o.xyxy for o in annotation_objects(s) if isinstance(o, Detection)]
            masks[k] = box_mask(np.array(wanted, dtype=np.float64).reshape(-1, 4), size, grid,
                                view=None if views is None else views[k])
    return masks, [list(s.boxes) for s in samples], sizes


def sample_views(adapter: Any, samples: Sequence[Sample]) -> np.ndarray:
    """[N, 4] float32: the rectangle of each sample's image the model sees
    (``adapter.image_view``), normalised; the whole image where the image cannot be read."""
    views = np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (len(samples), 1))
    sizes = [_image_size(s) for s in samples]
    distinct = sorted({z for z in sizes if z is not None})
    if not distinct:
        return views
    if hasattr(adapter, "image_views"):  # a Ray worker pool: one remote call for all sizes
        found = adapter.image_views(distinct)
    else:
        found = [adapter.image_view(z) for z in distinct]
    of = dict(zip(distinct, found))
    for k, z in enumerate(sizes):
        if z is not None:
            views[k] = of[z]
    return views


@dataclass
class CapturePlan:
    """A validated capture job: everything known before the model or the output is touched."""

    conditions: list[Condition]
    samples: list[Sample]
    index: list[int]  # each sample's position in the selected split
    n_selected: int  # samples selected before sharding (merge checks the shards add up)
    out: Path  # the file this job writes (the shard's own file with --shard)
    dims: tuple[int, int] | None  # (layers, heads) from the model config; None if unknown yet
    num_options: int
    box_masks: np.ndarray | None
    boxes: list[list[Any]] | None
    sizes: list[tuple[int, int]] | None


def plan_capture(*, model: str | Any, dataset: str, out: str | Path,
                 conditions: Sequence[str | Condition], data_root: str | None = None,
                 split: str = "all", limit: int | None = None, batch_size: int = 8,
                 shard: str | None = None, on_error: str = "stop", max_new_tokens: int = 16,
                 grid: int = 24, matcher: str = "paper", split_seed: int = 0,
                 prompt_style: str = "chat", log: Callable[[str], None] = print) -> CapturePlan:
    """Stage 1 of a capture: check every parameter and input, before any file or weights.

    Conditions are checked against the model's layer and head counts read from its config
    (:func:`vislens.models.model_dims`); memory for one batch and disk space for the
    working file are checked when those counts are known.
    """
    from .io import check_folder
    from .store import open_capture, shard_path, shard_rows

    conds = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    check_job(batch_size=batch_size, max_new_tokens=max_new_tokens, grid=grid, matcher=matcher,
              on_error=on_error, prompt_style=prompt_style)
    shard_t = parse_shard(shard) if shard is not None else None
    dims = (model.num_layers, model.num_heads) if not isinstance(model, (str, Path)) \
        else _config_dims(model)
    check_conditions(conds, *(dims or (None, None)))
    samples, index = select_samples(dataset, data_root, split=split, limit=limit,
                                    split_seed=split_seed)
    n_selected = len(samples)
    # the selection's option count, not the shard's: every shard of a job (and the
    # one-process run) gets the same num_options, so the shards merge
    num_options = max(len(s.options) for s in samples)
    keep = shard_rows(n_selected, shard_t)
    index = [index[k] for k in keep]
    samples = [samples[k] for k in keep]
    if prompt_style == "paper":
        missing = [s.id for s in samples if "<image>" not in s.meta.get("prompt", "")]
        if missing:
            raise VislensError(f"--prompt-style paper: sample {missing[0]} has no published "
                               "prompt (only the WhatsUp/AdaptVis question files carry one)")
    flagged = check_options_in_prompt(samples)
    if flagged:
        log(f"note: {len(flagged)} sample(s) whose gold answer is not offered by the prompt "
            f"(published data): {', '.join(flagged[:5])}")
    out_path = Path(out) if shard_t is None else shard_path(Path(out), *shard_t)
    check_folder(out_path)  # exists and writable, before any slow step
    if on_error == "stop":  # fail before loading the model, not after hours of work
        from .data import check_images

        problems = check_images(samples)
        if problems:
            sid, reason = problems[0]
            raise VislensError(f"sample {sid}: {reason} (use --on-error skip to list and skip "
                               f"{len(problems)} such sample(s))")
    if out_path.exists():  # resuming: it must be a capture (the job spec is checked on open)
        open_capture(out_path).close()
    masks, boxes, sizes = annotation_masks(samples, grid)
    plan = CapturePlan(conds, samples, index, n_selected, out_path, dims,
                       num_options, masks, boxes, sizes)
    if dims is not None:
        check_resources(plan, grid=grid, batch_size=batch_size)
    return plan


def check_prompt_style(adapter: Any, samples: Sequence[Sample], prompt_style: str) -> None:
    """``--prompt-style paper`` runs each sample's published prompt verbatim: refuse a model
    (an adapter or a Ray pool) that would wrap it in its own chat template instead, i.e. one
    whose image placeholder is not the prompts' ``<image>`` (Qwen2-VL)."""
    if prompt_style != "paper":
        return
    prompts = [s.meta["prompt"] for s in samples]
    if hasattr(adapter, "format_prompts"):  # a Ray worker pool: one remote call
        formatted = adapter.format_prompts(prompts)
    else:
        formatted = [adapter.format_prompt(p) for p in prompts]
    for s, prompt, got in zip(samples, prompts, formatted):
        if got != prompt:
            raise VislensError(f"--prompt-style paper: {adapter.name} cannot take sample {s.id}'s "
                               "published prompt verbatim (its image placeholder is not the "
                               "prompt's <image>; it would wrap the whole prompt in its own chat "
                               "template); use --prompt-style chat")


def check_resources(plan: CapturePlan, *, grid: int, batch_size: int) -> None:
    """Memory for one batch, and (for a new file) disk space for the working file."""
    from .io import check_free_space
    from .store import working_file_bytes

    assert plan.dims is not None
    check_memory(batch_size=batch_size, n_conditions=len(plan.conditions),
                 num_layers=plan.dims[0], num_heads=plan.dims[1], grid=grid)
    if not plan.out.exists():
        need = working_file_bytes(plan.samples, len(plan.conditions), grid, *plan.dims,
                                  plan.num_options)
        check_free_space(plan.out, need, "the working file")


def capture_attrs(adapter: Any, plan: CapturePlan, **job: Any) -> dict[str, Any]:
    """Stage 2: the root attrs a capture file records (model, data, job parameters).

    ``job``: dataset, data_root, split, split_seed, limit, max_new_tokens, matcher, shard,
    prompt_style and command, as given to :func:`run_capture`."""
    return {**adapter.describe(), "vislens_version": __version__, "dataset": job["dataset"],
            "data_root": str(job["data_root"] or ""), "split": job["split"],
            "split_seed": job["split_seed"],
            "limit": -1 if job["limit"] is None else job["limit"],
            "max_new_tokens": job["max_new_tokens"], "matcher": job["matcher"],
            "shard": job["shard"] or "", "total_samples": plan.n_selected,
            "prompt_style": job["prompt_style"],
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": job["command"] if job["command"] is not None else shlex.join(sys.argv)}


@dataclass
class Batch:
    """One engine run: the rows of ``samples`` it answered and what came out."""

    rows: list[int]
    samples: list[Sample]
    sizes: list[tuple[int, int]]  # original image sizes
    results: list[dict[str, ConditionResult]]
    correct: list[dict[str, bool]]


def run_batches(engine: "DecodingEngine", samples: Sequence[Sample], rows: Sequence[int],
                conditions: Sequence[Condition], *, batch_size: int, matcher: str = "paper",
                prompt_style: str = "chat",
                on_failure: Callable[[int, str], None] | None = None,
                progress: bool = False, desc: str = "capture") -> Iterator[Batch]:
    """Stage 3: run ``conditions`` on ``samples[rows]``, ``batch_size`` at a time.

    An unreadable image, or a sample the engine refuses on its own
    (:func:`vislens.decoding.run_leaving_out`), raises (one line naming it), or with
    ``on_failure`` is reported as ``on_failure(row, reason)`` and left out of its batch
    (``--on-error skip``).
    ``prompt_style="paper"`` uses each sample's published prompt verbatim.
    """
    from .decoding import run_leaving_out

    rows = list(rows)
    bar = _progress(len(rows), progress, desc)
    try:
        for start in range(0, len(rows), batch_size):
            check_stop()  # a SIGTERM whose exception was swallowed still stops the job here
            chunk = rows[start:start + batch_size]
            ok_rows, images = [], []
            for r in chunk:
                try:
                    images.append(open_image(samples[r]))
                    ok_rows.append(r)
                except VislensError as exc:
                    if on_failure is None:
                        raise
                    on_failure(r, str(exc))
            if ok_rows:
                batch = [samples[r] for r in ok_rows]
                questions = [s.meta["prompt"] if prompt_style == "paper" else s.question
                             for s in batch]  # a prompt holding <image> is used verbatim

                def refused(i: int, reason: str) -> None:
                    if on_failure is None:
                        raise VislensError(reason)
                    on_failure(ok_rows[i], reason)

                kept, results = run_leaving_out(engine, images, questions,
                                                [s.options for s in batch], conditions,
                                                [s.id for s in batch], refused)
                batch = [batch[i] for i in kept]
                correct = [{name: is_correct(res.text, s, matcher) for name, res in rs.items()}
                           for rs, s in zip(results, batch)]
                if kept:
                    yield Batch([ok_rows[i] for i in kept], batch, [images[i].size for i in kept],
                                results, correct)
            bar.update(len(chunk))
    finally:
        bar.close()


def pool_batches(pool: "ReplicaPool", samples: Sequence[Sample], rows: Sequence[int],
                 conditions: Sequence[Condition], *, batch_size: int, engine: dict[str, Any],
                 matcher: str = "paper", prompt_style: str = "chat",
                 on_failure: Callable[[int, str], None] | None = None,
                 progress: bool = False, desc: str = "capture") -> Iterator[Batch]:
    """:func:`run_batches` on a Ray worker pool: the same batches, in the order they finish.

    ``engine`` holds the :class:`~vislens.decoding.DecodingEngine` keyword arguments each
    worker uses (``attention_dtype`` by name, e.g. ``"float16"``). One progress bar counts
    the samples of all workers.
    """
    from .distributed import make_jobs

    rows = list(rows)
    bar = _progress(len(rows), progress, desc)

    def fail(row: int, reason: str) -> None:
        if on_failure is None:
            raise VislensError(reason)
        on_failure(row, reason)
        bar.update(1)

    try:
        jobs = make_jobs(samples, rows, conditions, batch_size=batch_size, engine=engine,
                         prompt_style=prompt_style, on_failure=fail)
        for _, out in pool.imap_unordered(jobs):
            check_stop()  # a SIGTERM whose exception was swallowed still stops the job here
            for r, reason in out.failures:
                fail(r, reason)
            if out.rows:
                batch = [samples[r] for r in out.rows]
                correct = [{name: is_correct(res.text, s, matcher) for name, res in rs.items()}
                           for rs, s in zip(out.results, batch)]
                yield Batch(list(out.rows), batch, list(out.sizes), out.results, correct)
                bar.update(len(out.rows))
    finally:
        bar.close()


def batches_of(adapter: Any, samples: Sequence[Sample], rows: Sequence[int],
               conditions: Sequence[Condition], *, engine: dict[str, Any], batch_size: int,
               matcher: str = "paper", prompt_style: str = "chat",
               on_failure: Callable[[int, str], None] | None = None,
               progress: bool = False, desc: str = "capture") -> Iterator[Batch]:
    """Stage 3 with a loaded adapter (:func:`run_batches`) or a Ray pool (:func:`pool_batches`)."""
    from .distributed import ReplicaPool

    kw = dict(batch_size=batch_size, matcher=matcher, prompt_style=prompt_style,
              on_failure=on_failure, progress=progress, desc=desc)
    if isinstance(adapter, ReplicaPool):
        return pool_batches(adapter, samples, rows, conditions, engine=engine, **kw)
    import torch

    from .decoding import DecodingEngine

    local = {k: getattr(torch, v) if k == "attention_dtype" else v for k, v in engine.items()}
    return run_batches(DecodingEngine(adapter, **local), samples, rows, conditions, **kw)


def check_loaded_model(model: Any, *, dtype: Any = "auto", device: str | None = "auto") -> None:
    """Refuse ``dtype`` / ``device`` that an already loaded model (adapter or Ray pool) does
    not have, in one line: it runs as it was loaded, so they could only be ignored.

    ``"auto"`` (or None) accepts what it has; ``"cuda"`` matches any GPU index; ``"balanced"``
    a model spread over devices (loaded with ``device="balanced"``)."""
    import torch

    from .models import resolve_dtype

    desc = model.describe()
    have_dtype, have_device = str(desc.get("dtype", "")), str(desc.get("device", ""))
    if dtype not in (None, "auto"):
        want = str(resolve_dtype(dtype, have_device)).replace("torch.", "")
        if want != have_dtype:
            raise VislensError(f"dtype {dtype!r}: the model given is already loaded in "
                               f"{have_dtype or 'an unknown dtype'}; pass dtype='auto' or "
                               f"load it in {want}")
    if device in (None, "auto"):
        return
    if device == "balanced":
        same = getattr(model, "device", None) == "balanced" or \
            bool(getattr(getattr(model, "model", None), "hf_device_map", None))
    else:
        try:
            w, h = torch.device(device), torch.device(have_device)
            same = w.type == h.type and (w.index is None or w.index == h.index)
        except (RuntimeError, TypeError, ValueError):
            same = False
    if not same:
        raise VislensError(f"device {device!r}: the model given is already loaded on "
                           f"{have_device or 'an unknown device'}; pass device='auto' or "
                           f"load it on {device}")


def run_capture(*, model: str | Any, dataset: str, out: str | Path,
                conditions: Sequence[str | Condition], data_root: str | None = None,
                split: str = "all", limit: int | None = None, batch_size: int = 8,
                shard: str | None = None, dtype: str = "auto", device: str = "auto",
                on_error: str = "stop", max_new_tokens: int = 16, grid: int = 24,
                matcher: str = "paper", split_seed: int = 0, prompt_style: str = "chat",
                command: str | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                ray: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None) -> CaptureSummary:
    """Capture attention and answers for every (sample, condition); resumable.

    ``model`` is a name/path for :func:`vislens.models.load_model`, an already loaded
    adapter or a :class:`vislens.distributed.ReplicaPool`; a loaded one runs as it was
    loaded, so ``dtype`` and ``device`` must then be ``"auto"`` or what it has
    (:func:`check_loaded_model`). With ``ray`` (``"local"``,
    ``"auto"`` or ``"HOST:PORT"``) the batches run on ``workers`` Ray actors, one model
    replica each, and this process writes the file (``docs/scale.md``). Stages:
    :func:`plan_capture` (every check), the output's lock, the model (or the Ray workers),
    :func:`capture_attrs` and the working file, then :func:`batches_of` into the writer.
    Returns a :class:`CaptureSummary`.
    """
    from .distributed import ReplicaPool, check_ray_options, open_session
    from .store import CaptureJob, CaptureWriter, lock_output

    check_ray_options(ray, workers, gpus_per_worker, shard)
    plan = plan_capture(model=model, dataset=dataset, out=out, conditions=conditions,
                        data_root=data_root, split=split, limit=limit, batch_size=batch_size,
                        shard=shard, on_error=on_error, max_new_tokens=max_new_tokens,
                        grid=grid, matcher=matcher, split_seed=split_seed,
                        prompt_style=prompt_style, log=log)
    lock = lock_output(plan.out)  # before the model: a refused second job costs nothing
    session = None
    try:
        if ray is not None:
            session = open_session(ray, model, workers=workers, gpus_per_worker=gpus_per_worker,
                                   dtype=dtype, device=device, log=log)
            adapter = session.pool
        elif isinstance(model, (str, Path)):
            from .models import load_model

            adapter = load_model(model, dtype=dtype, device=device)
        else:
            check_loaded_model(model, dtype=dtype, device=device)
            adapter = model
        if plan.dims is None:  # a hub model whose config was not cached: check before the file
            plan.dims = (adapter.num_layers, adapter.num_heads)
            check_conditions(plan.conditions, *plan.dims)
            check_resources(plan, grid=grid, batch_size=batch_size)
        check_prompt_style(adapter, plan.samples, prompt_style)
        attrs = capture_attrs(adapter, plan, dataset=dataset, data_root=data_root, split=split,
                              split_seed=split_seed, limit=limit, max_new_tokens=max_new_tokens,
                              matcher=matcher, shard=shard, prompt_style=prompt_style,
                              command=command)
        views = sample_views(adapter, plan.samples)
        if plan.boxes is not None:  # count only the part of each box the model sees
            plan.box_masks = annotation_masks(plan.samples, grid, views)[0]
        job = CaptureJob(samples=plan.samples, conditions=plan.conditions, grid=grid,
                         num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                         num_options=plan.num_options, attrs=attrs, sample_index=plan.index,
                         sizes=plan.sizes, box_masks=plan.box_masks, boxes=plan.boxes,
                         views=views)
        writer = CaptureWriter.open(plan.out, job, lock=lock)
    except BaseException:
        lock.release()
        if session is not None:
            session.close()
        raise
    pool = adapter if isinstance(adapter, ReplicaPool) else None
    t0 = time.perf_counter()
    written = failed = 0
    correct_counts = {c.name: [0, 0] for c in plan.conditions}

    def skip(row: int, reason: str) -> None:
        nonlocal failed
        writer.write_failure(row, reason)
        failed += 1

    try:
        pending = [int(r) for r in writer.pending_indices()]
        if len(pending) < len(plan.samples):
            log(f"resuming {plan.out}: {len(plan.samples) - len(pending)} of "
                f"{len(plan.samples)} samples already done")
        engine = {"max_new_tokens": max_new_tokens, "grid": grid, "attention_dtype": "float16"}
        for b in batches_of(adapter, plan.samples, pending, plan.conditions, engine=engine,
                            batch_size=batch_size, matcher=matcher, prompt_style=prompt_style,
                            on_failure=skip if on_error == "skip" else None,
                            progress=progress):
            writer.write_batch(b.rows, b.results, b.correct, sizes=b.sizes)
            for cr in b.correct:
                for name, ok in cr.items():
                    correct_counts[name][0] += int(ok)
                    correct_counts[name][1] += 1
            written += len(b.rows)
        complete = len(writer.pending_indices()) == 0
        extra = {}
        if pool is not None:
            pool.log_throughput()
            # every host that returned rows, in this run or (as recorded) before it
            extra["hosts"] = sorted(set(writer.attrs.get("hosts", [])) | set(pool.summary.hosts))
        final = writer.finalize(attrs=extra) if complete else plan.out
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            log(f"interrupted: {written} sample(s) written to {plan.out}; run the same "
                "command again to resume")
        try:  # the job's error stays the one raised; a failing close is logged
            _close_all(writer, session, log)
        except Exception as close_exc:
            log(f"also: {close_exc}")
        raise
    _close_all(writer, session, log)  # a failing close is the error (after the session closed)
    acc = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in correct_counts.items()}
    return CaptureSummary(Path(final), len(plan.samples), written, failed,
                          time.perf_counter() - t0, acc, complete,
                          pool.summary if pool is not None else None)


def _close_all(writer: Any, session: Any, log: Callable[[str], None]) -> None:
    """Close the writer, then the Ray session (if any) even when the writer's close raised;
    the writer's error propagates (a session error after it is logged, not raised)."""
    try:
        writer.close()
    except BaseException:
        if session is not None:
            try:
                session.close()
            except Exception as exc:
                log(f"also: {exc}")
        raise
    if session is not None:
        session.close()


def _config_dims(model: str | Path) -> tuple[int, int] | None:
    from .models import model_dims

    return model_dims(model)


def _progress(total: int, enabled: bool, desc: str):
    """The one progress bar of model-running jobs (capture, sweep): samples, on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", disable=not enabled, dynamic_ncols=True,
                desc=desc, file=sys.stderr)
