"""``vislens capture``: run decoding conditions over a benchmark into a resumable HDF5 file.

The job validates everything it can before touching the model or the output (conditions,
dataset, split, shard, images of the selected samples), then writes batch after batch through
:class:`vislens.store.CaptureWriter`, whose commit protocol makes a killed job resumable by
running the same command again.
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .data import Sample, assign_splits, load_dataset, select_split
from .decoding import Condition, DecodingEngine, check_conditions, parse_condition
from .errors import VislensError

MATCHERS = ("paper", "first-word")
#: largest analysis grid side (--grid); far above every supported model's patch grid
MAX_GRID = 256


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


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ``None`` -> None (see :func:`vislens.store.parse_shard`)."""
    from .store import parse_shard as parse

    return None if text is None else parse(text)


def check_job(*, batch_size: int, max_new_tokens: int, grid: int, matcher: str,
              on_error: str = "stop", prompt_style: str = "chat") -> None:
    """Every scalar job parameter, checked before any file or model is touched."""
    if on_error not in ("stop", "skip"):
        raise VislensError(f"--on-error {on_error!r}: choose stop or skip")
    if matcher not in MATCHERS:
        raise VislensError(f"--matcher {matcher!r}: choose one of {', '.join(MATCHERS)}")
    if batch_size < 1:
        raise VislensError(f"--batch-size {batch_size}: must be >= 1")
    if max_new_tokens < 1:
        raise VislensError(f"--max-new-tokens {max_new_tokens}: must be >= 1 (the answer needs "
                           "at least one token)")
    if not 1 <= grid <= MAX_GRID:
        raise VislensError(f"--grid {grid}: must be in 1..{MAX_GRID} (cells per side of the "
                           "analysis grid; the models' patch grids are 24-64)")
    if prompt_style not in ("chat", "paper"):
        raise VislensError(f"--prompt-style {prompt_style!r}: choose chat or paper")


def check_memory(*, batch_size: int, n_conditions: int, num_layers: int, num_heads: int,
                 grid: int) -> None:
    """Refuse a batch whose attention maps alone would not fit in the memory available now."""
    need = attention_bytes(batch_size, n_conditions, num_layers, num_heads, grid)
    free = _available_memory()
    if free is not None and need > free:
        from .io import human_bytes

        raise VislensError(f"--grid {grid} with --batch-size {batch_size} and {n_conditions} "
                           f"condition(s) needs about {human_bytes(need)} for the attention maps "
                           f"of one batch ({num_layers} layers x {num_heads} heads x {grid}x{grid}"
                           f"), but only {human_bytes(free)} of memory are available; lower "
                           "--batch-size or --grid")


def attention_bytes(batch_size: int, n_conditions: int, num_layers: int, num_heads: int,
                    grid: int) -> int:
    """Host memory of one batch's pooled attention maps: float32 while pooled and checked,
    float16 results per condition, and the same again while written (a safe upper bound)."""
    per_map = num_layers * num_heads * grid * grid
    return batch_size * per_map * (4 + 2 * n_conditions) * 2


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
                progress: bool = True, log: Callable[[str], None] = print) -> CaptureSummary:
    """Capture attention and answers for every (sample, condition); resumable.

    ``model`` is a name/path for :func:`vislens.models.load_model` or an already loaded
    adapter. Returns a :class:`CaptureSummary`.
    """
    import torch

    from .io import check_folder
    from .store import CaptureWriter, lock_output, open_capture, shard_path, shard_rows

    # 1. everything that can be checked without the model's weights or the output file
    conds = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    check_job(batch_size=batch_size, max_new_tokens=max_new_tokens, grid=grid, matcher=matcher,
              on_error=on_error, prompt_style=prompt_style)
    shard_t = parse_shard(shard)
    dims = (model.num_layers, model.num_heads) if not isinstance(model, (str, Path)) \
        else _config_dims(model)
    check_conditions(conds, *(dims or (None, None)))
    samples, index = select_samples(dataset, data_root, split=split, limit=limit,
                                    split_seed=split_seed)
    n_selected = len(samples)  # before sharding: merge checks shards add up to this
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
    out_path = Path(out)
    if shard_t is not None:
        out_path = shard_path(out_path, *shard_t)
    check_folder(out_path)  # exists and writable, before any slow step
    if on_error == "stop":  # fail before loading the model, not after hours of work
        from .data import check_images

        problems = check_images(samples)
        if problems:
            sid, reason = problems[0]
            raise VislensError(f"sample {sid}: {reason} (use --on-error skip to list and skip "
                               f"{len(problems)} such sample(s))")
    num_options = max(len(s.options) for s in samples)
    if out_path.exists():  # resuming: it must be a capture (the job spec is checked on open)
        open_capture(out_path).close()
    if dims is not None:
        _check_resources(out_path, samples, conds, grid, num_options, batch_size, dims)
    masks, boxes, sizes = annotation_masks(samples, grid)

    # 2. the output's one-writer lock, then the model, then the working file
    lock = lock_output(out_path)
    try:
        if isinstance(model, (str, Path)):
            from .models import load_model

            adapter = load_model(model, dtype=dtype, device=device)
        else:
            adapter = model
        if dims is None:  # a hub model whose config was not cached: check now, still before the file
            dims = (adapter.num_layers, adapter.num_heads)
            check_conditions(conds, *dims)
            _check_resources(out_path, samples, conds, grid, num_options, batch_size, dims)
        attrs = {**adapter.describe(), "vislens_version": __version__, "dataset": dataset,
                 "data_root": str(data_root or ""), "split": split, "split_seed": split_seed,
                 "limit": -1 if limit is None else limit, "max_new_tokens": max_new_tokens,
                 "matcher": matcher, "shard": shard or "", "total_samples": n_selected,
                 "prompt_style": prompt_style,
                 "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": command if command is not None else shlex.join(sys.argv)}
        writer = CaptureWriter.open(out_path, samples=samples, conditions=conds, grid=grid,
                                    num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                                    num_options=num_options, attrs=attrs, sample_index=index,
                                    sizes=sizes, box_masks=masks, boxes=boxes, lock=lock)
    except BaseException:
        lock.release()
        raise
    t0 = time.perf_counter()
    written = failed = 0
    correct_counts = {c.name: [0, 0] for c in conds}
    try:
        pending = [int(r) for r in writer.pending_indices()]
        if len(pending) < len(samples):
            log(f"resuming {out_path}: {len(samples) - len(pending)} of {len(samples)} samples "
                "already done")
        engine = DecodingEngine(adapter, max_new_tokens=max_new_tokens, grid=grid,
                                attention_dtype=torch.float16)
        bar = _progress(len(pending), enabled=progress)
        for start in range(0, len(pending), batch_size):
            rows = pending[start:start + batch_size]
            ok_rows, images = [], []
            for r in rows:
                try:
                    images.append(_open_image(samples[r]))
                    ok_rows.append(r)
                except VislensError as exc:
                    if on_error == "stop":
                        raise
                    writer.write_failure(r, str(exc))
                    failed += 1
            if ok_rows:
                batch = [samples[r] for r in ok_rows]
                questions = [s.meta["prompt"] if prompt_style == "paper" else s.question
                             for s in batch]  # a prompt holding <image> is used verbatim
                results = engine.run(images, questions,
                                     [s.options for s in batch], conds,
                                     sample_keys=[s.id for s in batch])
                correct = [{name: is_correct(res.text, s, matcher) for name, res in rs.items()}
                           for rs, s in zip(results, batch)]
                writer.write_batch(ok_rows, results, correct,
                                   sizes=[im.size for im in images])
                for cr in correct:
                    for name, ok in cr.items():
                        correct_counts[name][0] += int(ok)
                        correct_counts[name][1] += 1
                written += len(ok_rows)
            bar.update(len(rows))
        bar.close()
        complete = len(writer.pending_indices()) == 0
        final = writer.finalize() if complete else out_path
    except KeyboardInterrupt:
        log(f"interrupted: {written} sample(s) written to {out_path}; run the same command "
            "again to resume")
        raise
    finally:
        writer.close()
    acc = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in correct_counts.items()}
    return CaptureSummary(Path(final), len(samples), written, failed,
                          time.perf_counter() - t0, acc, complete)


def _config_dims(model: str | Path) -> tuple[int, int] | None:
    from .models import model_dims

    return model_dims(model)


def _check_resources(out_path: Path, samples: Sequence[Sample], conds: Sequence[Condition],
                     grid: int, num_options: int, batch_size: int, dims: tuple[int, int]) -> None:
    """Memory for one batch, and (for a new file) disk space for the working file."""
    from .io import check_free_space
    from .store import working_file_bytes

    check_memory(batch_size=batch_size, n_conditions=len(conds), num_layers=dims[0],
                 num_heads=dims[1], grid=grid)
    if not out_path.exists():
        check_free_space(out_path, working_file_bytes(samples, len(conds), grid, *dims,
                                                      num_options), "the working file")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", disable=not enabled, dynamic_ncols=True,
                desc="capture", file=sys.stderr)
