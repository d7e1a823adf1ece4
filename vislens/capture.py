"""``vislens capture``: run decoding conditions over a benchmark into a resumable HDF5 file.

The job validates everything it can before touching the model or the output (conditions,
dataset, split, shard, images of the selected samples), then writes batch after batch through
:class:`vislens.store.CaptureWriter`, whose commit protocol makes a killed job resumable by
running the same command again.
"""
from __future__ import annotations

import datetime as _dt
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import __version__
from .data import Sample, assign_splits, load_dataset, select_split
from .decoding import Condition, DecodingEngine, check_conditions, parse_condition
from .errors import VislensError

MATCHERS = ("paper", "first-word")


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


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise VislensError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise VislensError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def is_correct(prediction: str, sample: Sample, matcher: str = "paper") -> bool:
    """Answer matching: the paper's substring rule (VSR: its case-sensitive Yes/No) or strict first word."""
    from .evaluate import match_first_word, match_paper, match_vsr_paper

    if matcher == "first-word":
        return match_first_word(prediction, sample.answer)
    if [o.lower() for o in sample.options] == ["yes", "no"]:
        return match_vsr_paper(prediction, int(sample.answer.lower() == "yes"))
    return match_paper(prediction, sample.answer)


def check_options_in_prompt(samples: Sequence[Sample]) -> list[str]:
    """Samples whose options are not all offered by the question's "Answer with ..." clause.

    Raises for the first such sample unless the loader flagged it as a known quirk of the
    published data (``meta["answer_not_in_options"]``); returns the ids of flagged ones.
    """
    flagged = []
    for s in samples:
        q = s.question.lower()
        if "answer with" not in q:
            continue
        offered = q.split("answer with", 1)[1]
        missing = [o for o in s.options if o.lower() not in offered]
        if missing:
            if s.meta.get("answer_not_in_options"):
                flagged.append(s.id)
                continue
            raise VislensError(f"sample {s.id}: option(s) {missing} are not offered by its prompt "
                               f"({s.question[-80:]!r})")
    return flagged


def select_samples(dataset: str, data_root: str | None, *, split: str = "all",
                   limit: int | None = None, shard: tuple[int, int] | None = None,
                   split_seed: int = 0, val_fraction: float = 0.2
                   ) -> tuple[list[Sample], list[int]]:
    """Load, split, limit and shard a dataset; returns samples and their indices in the split."""
    if split not in ("val", "test", "all"):
        raise VislensError(f"--split {split!r}: choose val, test or all")
    samples = load_dataset(dataset, data_root)
    if not samples:
        raise VislensError(f"dataset {dataset} has no samples")
    assign_splits(samples, val_fraction=val_fraction, seed=split_seed)
    chosen = select_split(samples, split)
    if limit is not None:
        if limit < 1:
            raise VislensError(f"--limit {limit}: must be >= 1")
        chosen = chosen[:limit]
    index = list(range(len(chosen)))
    if shard is not None:
        i, n = shard
        index = index[i::n]
        chosen = [chosen[k] for k in index]
    return chosen, index


def _open_image(sample: Sample):
    from PIL import Image

    path = sample.image_path
    if not path:
        raise VislensError(f"sample {sample.id}: no image path")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise VislensError(f"{path}: image not found (sample {sample.id})") from None
    except Exception as exc:  # PIL raises many types; ultralytics' patched open adds more
        raise VislensError(f"{path}: cannot decode image (sample {sample.id}): "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _image_size(sample: Sample) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(sample.image_path) as im:
            return im.size
    except Exception:
        return None


def annotation_masks(samples: Sequence[Sample], grid: int):
    """Box masks from the dataset's own boxes (synthetic scenes, JSONL), or None."""
    if not any(s.boxes for s in samples):
        return None, None, None
    from .boxes import box_mask

    sizes, masks = [], np.zeros((len(samples), grid, grid), dtype=np.float32)
    for k, s in enumerate(samples):
        size = _image_size(s) or (0, 0)
        sizes.append(size)
        if s.boxes and size[0] > 0:
            wanted = [b for b in s.boxes if not s.objects or b.label in s.objects] or s.boxes
            masks[k] = box_mask(np.array([b.xyxy for b in wanted], dtype=np.float64), size, grid)
    return masks, [list(s.boxes) for s in samples], sizes


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
    adapter, or a :class:`vislens.distributed.ReplicaPool`. With ``ray`` (``"local"``,
    ``"auto"`` or ``"HOST:PORT"``) the batches run on ``workers`` Ray actors, one model
    replica each, and this process writes the file (``docs/scale.md``). Returns a
    :class:`CaptureSummary`.
    """
    from .distributed import check_ray_options
    from .store import shard_path

    conds = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    check_conditions(conds)
    check_ray_options(ray, workers, gpus_per_worker, shard)
    if on_error not in ("stop", "skip"):
        raise VislensError(f"--on-error {on_error!r}: choose stop or skip")
    if matcher not in MATCHERS:
        raise VislensError(f"--matcher {matcher!r}: choose one of {', '.join(MATCHERS)}")
    if batch_size < 1:
        raise VislensError(f"--batch-size {batch_size}: must be >= 1")
    if prompt_style not in ("chat", "paper"):
        raise VislensError(f"--prompt-style {prompt_style!r}: choose chat or paper")
    shard_t = parse_shard(shard)
    samples, index = select_samples(dataset, data_root, split=split, limit=limit,
                                    split_seed=split_seed)
    n_selected = len(samples)  # before sharding: merge checks shards add up to this
    if shard_t is not None:  # load once, then shard (as select_samples(shard=...) does)
        i, n = shard_t
        index = index[i::n]
        samples = samples[i::n]
    if prompt_style == "paper":
        missing = [s.id for s in samples if "<image>" not in s.meta.get("prompt", "")]
        if missing:
            raise VislensError(f"--prompt-style paper: sample {missing[0]} has no published "
                               "prompt (only the WhatsUp/AdaptVis question files carry one)")
    flagged = check_options_in_prompt(samples)
    if flagged:
        log(f"note: {len(flagged)} sample(s) whose gold answer is not offered by the prompt "
            f"(published data): {', '.join(flagged[:5])}")
    out_path = Path(out)
    if shard_t is not None:
        out_path = shard_path(out_path, *shard_t)
    if on_error == "stop":  # fail before loading the model, not after hours of work
        from .data import check_images

        problems = check_images(samples)
        if problems:
            sid, reason = problems[0]
            raise VislensError(f"sample {sid}: {reason} (use --on-error skip to list and skip "
                               f"{len(problems)} such sample(s))")
    masks, boxes, sizes = annotation_masks(samples, grid)

    session = None
    if ray is not None:
        from .distributed import open_session

        session = open_session(ray, model, workers=workers, gpus_per_worker=gpus_per_worker,
                               dtype=dtype, device=device, log=log)
        adapter = session.pool
    elif isinstance(model, (str, Path)):
        from .models import load_model

        adapter = load_model(model, dtype=dtype, device=device)
    else:
        adapter = model
    try:
        return _capture_into(adapter, samples=samples, conds=conds, out_path=out_path,
                             index=index, sizes=sizes, masks=masks, boxes=boxes, dataset=dataset,
                             data_root=data_root, split=split, split_seed=split_seed, limit=limit,
                             max_new_tokens=max_new_tokens, matcher=matcher, shard=shard,
                             n_selected=n_selected, prompt_style=prompt_style, command=command,
                             grid=grid, batch_size=batch_size, on_error=on_error,
                             progress=progress, log=log)
    finally:
        if session is not None:
            session.close()


def _capture_into(adapter: Any, *, samples: list[Sample], conds: list[Condition],
                  out_path: Path, index: list[int], sizes: Any, masks: Any, boxes: Any,
                  dataset: str, data_root: str | None, split: str, split_seed: int,
                  limit: int | None, max_new_tokens: int, matcher: str, shard: str | None,
                  n_selected: int, prompt_style: str, command: str | None, grid: int,
                  batch_size: int, on_error: str, progress: bool,
                  log: Callable[[str], None]) -> CaptureSummary:
    """The writing half of :func:`run_capture`: open the file, run the batches, finalize."""
    import torch

    from .distributed import ReplicaPool
    from .store import CaptureWriter

    attrs = {**adapter.describe(), "vislens_version": __version__, "dataset": dataset,
             "data_root": str(data_root or ""), "split": split, "split_seed": split_seed,
             "limit": -1 if limit is None else limit, "max_new_tokens": max_new_tokens,
             "matcher": matcher, "shard": shard or "", "total_samples": n_selected,
             "prompt_style": prompt_style,
             "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "command": command if command is not None else shlex.join(sys.argv)}
    num_options = max(len(s.options) for s in samples)
    writer = CaptureWriter.open(out_path, samples=samples, conditions=conds, grid=grid,
                                num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                                num_options=num_options, attrs=attrs, sample_index=index,
                                sizes=sizes, box_masks=masks, boxes=boxes)
    t0 = time.perf_counter()
    written = failed = 0
    correct_counts = {c.name: [0, 0] for c in conds}

    def skip(row: int, reason: str) -> None:
        nonlocal failed
        if on_error == "stop":
            raise VislensError(reason)
        writer.write_failure(row, reason)
        failed += 1
        bar.update(1)

    pool = adapter if isinstance(adapter, ReplicaPool) else None
    try:
        pending = [int(r) for r in writer.pending_indices()]
        if len(pending) < len(samples):
            log(f"resuming {out_path}: {len(samples) - len(pending)} of {len(samples)} samples "
                "already done")
        bar = _progress(len(pending), enabled=progress)
        if pool is None:
            engine = DecodingEngine(adapter, max_new_tokens=max_new_tokens, grid=grid,
                                    attention_dtype=torch.float16)
            batches = _local_batches(engine, samples, pending, conds, batch_size=batch_size,
                                     prompt_style=prompt_style, on_failure=skip)
        else:
            batches = _pool_batches(pool, samples, pending, conds, batch_size=batch_size,
                                    engine={"max_new_tokens": max_new_tokens, "grid": grid,
                                            "attention_dtype": "float16"},
                                    prompt_style=prompt_style, on_failure=skip)
        for ok_rows, results, image_sizes in batches:
            batch = [samples[r] for r in ok_rows]
            correct = [{name: is_correct(res.text, s, matcher) for name, res in rs.items()}
                       for rs, s in zip(results, batch)]
            writer.write_batch(ok_rows, results, correct, sizes=image_sizes)
            for cr in correct:
                for name, ok in cr.items():
                    correct_counts[name][0] += int(ok)
                    correct_counts[name][1] += 1
            written += len(ok_rows)
            bar.update(len(ok_rows))
        bar.close()
        if pool is not None:
            pool.log_throughput()
        complete = len(writer.pending_indices()) == 0
        if complete and pool is not None:  # every host that wrote rows, this run or before
            hosts = sorted(set(writer.attrs.get("hosts", [])) | set(pool.summary.hosts))
            final = writer.finalize(attrs={"hosts": hosts})
        else:
            final = writer.finalize() if complete else out_path
    except KeyboardInterrupt:
        log(f"interrupted: {written} sample(s) written to {out_path}; run the same command "
            "again to resume")
        raise
    finally:
        writer.close()
    acc = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in correct_counts.items()}
    return CaptureSummary(Path(final), len(samples), written, failed,
                          time.perf_counter() - t0, acc, complete,
                          pool.summary if pool is not None else None)


Batches = Iterator[tuple[list[int], list[dict[str, Any]], list[tuple[int, int]]]]


def _local_batches(engine: DecodingEngine, samples: Sequence[Sample], rows: Sequence[int],
                   conds: Sequence[Condition], *, batch_size: int, prompt_style: str,
                   on_failure: Callable[[int, str], None]) -> Batches:
    """(rows answered, results, image sizes) per batch, run in this process."""
    for start in range(0, len(rows), batch_size):
        ok_rows, images = [], []
        for r in rows[start:start + batch_size]:
            try:
                images.append(_open_image(samples[r]))
                ok_rows.append(r)
            except VislensError as exc:
                on_failure(r, str(exc))
        if ok_rows:
            batch = [samples[r] for r in ok_rows]
            questions = [s.meta["prompt"] if prompt_style == "paper" else s.question
                         for s in batch]  # a prompt holding <image> is used verbatim
            results = engine.run(images, questions, [s.options for s in batch], conds,
                                 sample_keys=[s.id for s in batch])
            yield ok_rows, results, [im.size for im in images]


def _pool_batches(pool: Any, samples: Sequence[Sample], rows: Sequence[int],
                  conds: Sequence[Condition], *, batch_size: int, engine: dict[str, Any],
                  prompt_style: str, on_failure: Callable[[int, str], None]) -> Batches:
    """The same batches, run on a Ray worker pool, in the order they finish."""
    from .distributed import make_jobs

    jobs = make_jobs(samples, rows, conds, batch_size=batch_size, engine=engine,
                     prompt_style=prompt_style, on_failure=on_failure)
    for _, out in pool.imap_unordered(jobs):
        for r, reason in out.failures:
            on_failure(r, reason)
        if out.rows:
            yield out.rows, out.results, out.sizes


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", disable=not enabled, dynamic_ncols=True,
                desc="capture", file=sys.stderr)
