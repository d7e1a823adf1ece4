"""Editing finished captures: merging shards (and how shards are named and chosen),
replacing ``/boxes``."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..errors import VislensError
from ..io import check_output, real_path
from . import compact
from .format import (RESUME_IGNORED_ATTRS, check_format, done_matrix, failed_flags,
                     format_version, fsync_dir, fsync_path, open_h5, plain_value, read_attrs,
                     short_repr, read_text, read_values, tmp_of, unlink_quietly, write_boxes)
from .lock import OutputLock

_MERGE_IGNORED = RESUME_IGNORED_ATTRS | {"shard", "merged_from"}


def shard_path(out: str | Path, i: int, n: int) -> Path:
    """Path of shard ``i`` (0-based, as ``--shard I/N``) of ``n``: ``run.h5`` -> ``run.shard0-of-4.h5``."""
    out = Path(out)
    if not 0 <= i < n:
        raise VislensError(f"shard {i}/{n}: expected 0 <= i < n")
    suffix = out.suffix or ".h5"
    return out.with_name(f"{out.stem if out.suffix else out.name}.shard{i}-of-{n}{suffix}")


def parse_shard(value: Any) -> tuple[int, int]:
    """``"I/N"`` (``--shard``; or ``[I, N]`` as read back from a ``shard`` attr) -> ``(I, N)``
    with ``0 <= I < N``; anything else is a one-line VislensError."""
    if isinstance(value, (list, tuple)) and len(value) == 2 \
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        i, n = int(value[0]), int(value[1])
    else:
        m = re.fullmatch(r"\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*", str(value))
        if m is None:
            raise VislensError(f"--shard {value!r}: expected I/N, e.g. 0/4 (shard I of N, "
                               "counted from 0)")
        i, n = int(m.group(1)), int(m.group(2))
    if not (n >= 1 and 0 <= i < n):
        raise VislensError(f"--shard {value!r}: need 0 <= I < N (shards of N are 0/N .. "
                           f"{max(n, 1) - 1}/N)")
    return i, n


def shard_rows(n_rows: int, shard: tuple[int, int] | None) -> list[int]:
    """The rows shard ``(i, n)`` takes of ``n_rows``: every n-th from i (all for None).

    An empty shard (more shards than rows) is refused in one line."""
    if shard is None:
        return list(range(n_rows))
    i, n = shard
    rows = list(range(i, n_rows, n))
    if not rows:
        raise VislensError(f"--shard {i}/{n}: shard {i} of {n} has no samples (only {n_rows} "
                           f"sample(s) selected); use at most {n_rows} shard(s)")
    return rows


def _shard_attr(f: h5py.File, path: Path) -> tuple[int, int] | None:
    value = plain_value(f.attrs.get("shard"))
    if value is None or value == "":
        return None
    try:
        return parse_shard(value)
    except VislensError:
        raise VislensError(f"{path}: merge: malformed shard attr {short_repr(value)} "
                           "(expected \"I/N\")") from None


def merge(out: str | Path, shards: Sequence[str | Path], *, force: bool = False) -> Path:
    """Combine shard captures of one job into one final file ordered by ``/samples/index``.

    Every shard must have the same spec (model, grid, shapes, conditions and their attrs,
    other attrs except ``shard``/``command``/...), be complete (every sample done or
    failed), and no dataset position may occur twice. With a ``shard`` attr like
    ``"2/4"`` every shard 0..n-1 of one n must be given; with a ``total_samples`` attr the shards
    must hold that many samples. The result equals an unsharded run's file (see
    ``docs/capture-format.md`` for how exactly). An existing ``out`` is refused unless
    ``force``; a symlinked ``out`` stays a link (its target is written).
    """
    out = Path(out)
    paths = [Path(p) for p in shards]
    if not paths:
        raise VislensError(f"{out}: merge: no shard files given")
    real = real_path(out)
    if any(real_path(p) == real for p in paths if p.exists()):
        raise VislensError(f"{out}: merge: the output is also one of the shards")
    check_output(out, force=force)
    lock = OutputLock(out)
    files: list[h5py.File] = []
    tmp = tmp_of(real)
    try:
        for p in paths:
            f = open_h5(p)
            files.append(f)
            check_format(f, p)
        versions = [format_version(f) for f in files]
        for p, v in zip(paths[1:], versions[1:]):
            if v != versions[0]:
                raise VislensError(f"{p}: merge: capture format version {v} but {versions[0]} in "
                                   f"{paths[0]}; shards of one job share a version (rerun the "
                                   "older shards with this vislens)")
        ref = _merge_spec(files[0])
        for p, f in zip(paths[1:], files[1:]):
            spec = _merge_spec(f)
            for key in sorted(set(ref) | set(spec), key=lambda k: (k != "conditions", k)):
                if ref.get(key) != spec.get(key):
                    raise VislensError(f"{p}: merge: {key} is {short_repr(spec.get(key))} but "
                                       f"{short_repr(ref.get(key))} in {paths[0]}")
        shard_ids = [_shard_attr(f, p) for p, f in zip(paths, files)]
        if all(s is not None for s in shard_ids):
            first = shard_ids[0]
            assert first is not None
            for p, s in zip(paths[1:], shard_ids[1:]):
                assert s is not None
                if s[1] != first[1]:  # not one job's shards: the missing-shard check needs one N
                    raise VislensError(f"{p}: merge: shard {s[0]}/{s[1]} but {first[0]}/{first[1]} "
                                       f"in {paths[0]}; shards of one job have the same count")
            seen: dict[int, Path] = {}
            for p, s in zip(paths, shard_ids):
                assert s is not None
                if s[0] in seen:
                    raise VislensError(f"{p}: merge: shard {s[0]}/{s[1]} given twice "
                                       f"(also {seen[s[0]]})")
                seen[s[0]] = p
            n_shards = first[1]
            if len(seen) != n_shards:
                base = 0  # --shard I/N is 0-based
                missing = [i for i in range(base, base + n_shards) if i not in seen]
                raise VislensError(f"{out}: merge: missing shard(s) "
                                   f"{', '.join(f'{i}/{n_shards}' for i in missing)} "
                                   f"(got {len(seen)} of {n_shards})")
        for p, f in zip(paths, files):
            pending = np.flatnonzero(~(done_matrix(f).all(axis=0) | failed_flags(f)))
            if pending.size:
                ids = read_text(f["samples/id"], pending[:3].tolist())
                raise VislensError(f"{p}: merge: {pending.size} sample(s) not done (e.g. "
                                   f"{', '.join(map(str, ids))}); resume that shard first")
        owner: dict[int, int] = {}
        src_list, row_list, idx_list = [], [], []
        for s, (p, f) in enumerate(zip(paths, files)):
            idx = read_values(f["samples/index"])
            for j, i in enumerate(idx.tolist()):
                if i in owner:
                    other = paths[owner[i]]
                    raise VislensError(f"{p}: merge: sample index {i} (id "
                                       f"{str(read_text(f['samples/id'], j))!r}) is also in {other}")
                owner[i] = s
            src_list.append(np.full(idx.size, s, dtype=np.int64))
            row_list.append(np.arange(idx.size, dtype=np.int64))
            idx_list.append(idx)
        index = np.concatenate(idx_list)
        total = plain_value(files[0].attrs.get("total_samples"))
        if isinstance(total, int) and index.size != total:
            raise VislensError(f"{out}: merge: shards hold {index.size} samples but "
                               f"total_samples is {total}")
        order = np.argsort(index, kind="stable")
        src_of = np.concatenate(src_list)[order]
        row_of = np.concatenate(row_list)[order]
        attrs = read_attrs(files[0])
        attrs.pop("shard", None)
        attrs["complete"] = True
        attrs["merged_from"] = [p.name for p in paths]
        with compact.writing_file(out, "merge", real):
            compact.build_final(tmp, files, src_of, row_of, attrs)
            for f in files:
                f.close()
            files.clear()
            fsync_path(tmp)
            os.replace(tmp, real)
            fsync_dir(real)
        return out
    except BaseException:
        unlink_quietly(tmp)
        raise
    finally:
        for f in files:
            f.close()
        lock.release()


def _merge_spec(f: h5py.File) -> dict[str, Any]:
    """What must agree between shards of one job."""
    attrs = {k: v for k, v in read_attrs(f).items() if k not in _MERGE_IGNORED}
    spec: dict[str, Any] = {f"attr {k}": v for k, v in attrs.items()}
    spec["conditions"] = list(f["conditions"])
    for c in f["conditions"]:
        spec[f"conditions/{c} attrs"] = read_attrs(f[f"conditions/{c}"])
    spec["/boxes present"] = "boxes" in f
    spec["/boxes/mask present"] = "boxes/mask" in f
    if "boxes" in f:
        spec["/boxes source"] = plain_value(f["boxes"].attrs.get("source"))
    return spec


def replace_boxes(path: str | Path, masks: np.ndarray, boxes: Sequence[Sequence[Any]],
                  source: str, unmatched: Sequence[Sequence[Any]] | None = None, *,
                  lock: OutputLock | None = None) -> Path:
    """Replace ``/boxes`` of a complete capture, atomically (``FILE.tmp`` + ``os.replace``).

    ``boxes[i]`` are objects with ``label``, ``xyxy`` (and ``score``) for sample row ``i``;
    ``unmatched[i]`` objects with ``label`` and ``reason`` (question objects without a box)
    go to ``/boxes/unmatched_{sample,label,reason}``. The capture's other content is copied
    chunk for chunk; a kill at any moment leaves either the old or the new file, and a full
    disk leaves the old one (one-line error). ``lock`` (from :func:`lock_output`, taken
    before a slow detection) is adopted and released.
    """
    path = Path(path)
    lock = OutputLock(path) if lock is None else lock
    real = real_path(path)
    tmp = tmp_of(real)
    try:
        with open_h5(real) as src:
            check_format(src, path)
            attrs = read_attrs(src)
            if not attrs.get("complete"):
                raise VislensError(f"{path}: the capture is not complete; finish (resume) the "
                                   "capture job before adding boxes")
            n = src["samples/id"].shape[0]
            if masks.shape[0] != n or len(boxes) != n:
                raise VislensError(f"{path}: {masks.shape[0]} masks / {len(boxes)} box lists for "
                                   f"{n} samples")
            with compact.writing_file(path, "writing the boxes", real):
                compact.build_final(tmp, [src], np.zeros(n, dtype=np.int64), np.arange(n), attrs,
                             with_boxes=False)
        with compact.writing_file(path, "writing the boxes", real):
            with h5py.File(tmp, "r+", locking=False) as f:
                write_boxes(f, masks.astype(np.float32), boxes, source, fixed=False)
                if unmatched is not None:
                    rows = [i for i, us in enumerate(unmatched) for _ in us]
                    labels = [str(u.label) for us in unmatched for u in us]
                    reasons = [str(u.reason) for us in unmatched for u in us]
                    gb = f["boxes"]
                    gb.create_dataset("unmatched_sample", data=np.asarray(rows, dtype=np.int64))
                    gb.create_dataset("unmatched_label", data=np.asarray(labels, dtype=object),
                                      dtype=h5py.string_dtype("utf-8"))
                    gb.create_dataset("unmatched_reason", data=np.asarray(reasons, dtype=object),
                                      dtype=h5py.string_dtype("utf-8"))
            fsync_path(tmp)
            os.replace(tmp, real)
            fsync_dir(real)
    except BaseException:
        unlink_quietly(tmp)
        raise
    finally:
        lock.release()
    return path
