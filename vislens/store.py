"""Capture files: one crash-safe, resumable, self-describing HDF5 file per capture job.

A job writes a *working file* whose every dataset is created at its final size with all
storage allocated up front (uncompressed, fixed-length strings, attributes written once),
so that afterwards the writer only overwrites raw bytes in place and never changes HDF5
metadata: a ``kill -9`` at any moment leaves a readable file. Each batch is committed by
writing its rows, flushing, then setting the per-condition ``done`` flags and flushing
again, so a sample is either complete or redone on resume. When every sample is done (or
failed), :meth:`CaptureWriter.finalize` rewrites the file compressed (variable-length
strings, gzip + shuffle, ``complete=True``) into ``FILE.tmp`` and atomically replaces
``FILE``. The reader (:func:`open_capture`) reads working and final files the same way.
The format is specified in ``docs/capture-format.md``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import zlib
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import h5py
import numpy as np
import pandas as pd

from .errors import VislensError
from .io import (IO_ERRORS, check_folder, check_free_space, check_output, human_bytes,
                 is_disk_full, os_reason, real_path)

try:  # ISA-L inflates deflate streams ~1.6x faster than zlib; reading is decode-bound
    from isal.isal_zlib import decompress as _inflate
except ImportError:  # pragma: no cover - isal is a dependency, but has no wheel everywhere
    from zlib import decompress as _inflate

if TYPE_CHECKING:  # decoding imports torch; the store must not
    from .data.base import Box, Sample
    from .decoding import Condition, ConditionResult

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PREDICTION_BYTES",
    "REASON_BYTES",
    "Capture",
    "CaptureWriter",
    "merge",
    "open_capture",
    "shard_path",
    "parse_shard",
    "shard_rows",
    "lock_output",
    "sample_fingerprint",
    "working_file_bytes",
    "replace_boxes",
]

FORMAT = "vislens-capture"
FORMAT_VERSION = 1
#: predictions are stored truncated to this many utf-8 bytes (cut at a character boundary)
PREDICTION_BYTES = 256
#: failure reasons are stored truncated to this many utf-8 bytes
REASON_BYTES = 512
#: root attrs that may differ between a job and the file it resumes (or between shards)
RESUME_IGNORED_ATTRS = frozenset({
    "command", "created_utc", "vislens_version", "complete", "batch_size", "device",
    "num_workers", "hostname", "pid", "resumed",
})
#: hex characters of a sample's content fingerprint (sha256)
FINGERPRINT_CHARS = 64
#: gzip level of the final file
GZIP_LEVEL = 1  # attention maps compress ~1.2x at any level; 1 is the fastest

SAMPLE_TEXT_FIELDS = ("id", "question", "answer", "relation", "image_path", "group", "split")
_STORE_OWNED = ("format", "format_version", "grid", "num_layers", "num_heads", "num_options",
                "complete")
_SPEC_FIELDS = ("model", "model_revision", "dataset", "grid", "num_layers", "num_heads",
                "num_options")
_MERGE_IGNORED = RESUME_IGNORED_ATTRS | {"shard", "merged_from"}
_BLOCK = 32  # attention rows handled per step when compacting


# ----------------------------------------------------------------------------- helpers


def shard_path(out: str | Path, i: int, n: int) -> Path:
    """Path of shard ``i`` (0-based, as ``--shard I/N``) of ``n``: ``run.h5`` -> ``run.shard0-of-4.h5``."""
    out = Path(out)
    if not 0 <= i < n:
        raise VislensError(f"shard {i}/{n}: expected 0 <= i < n")
    suffix = out.suffix or ".h5"
    return out.with_name(f"{out.stem if out.suffix else out.name}.shard{i}-of-{n}{suffix}")


def _utf8(text: Any, limit: int | None = None) -> bytes:
    """utf-8 bytes of ``text``, cut to ``limit`` bytes at a character boundary."""
    b = str(text).encode("utf-8", "replace")
    if limit is not None and len(b) > limit:
        b = b[:limit].decode("utf-8", "ignore").encode("utf-8")
    return b


def _fixed(values: Sequence[Any], width: int, limit: int | None = None) -> np.ndarray:
    """Fixed-length utf-8 string array (h5py dtype) of byte width ``width``."""
    return np.array([_utf8(v, limit) for v in values], dtype=h5py.string_dtype("utf-8", width))


def _text(ds: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """Read a fixed- or variable-length utf-8 string dataset as an object array of str."""
    try:
        return np.asarray(ds.asstr()[sel], dtype=object)
    except IO_ERRORS as exc:
        raise _corrupt(ds, exc) from None


def _values(ds: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """``ds[sel]``; a chunk that cannot be read (corrupted bytes) is one line naming the
    file, the condition and the rows."""
    try:
        return ds[sel]
    except IO_ERRORS as exc:
        raise _corrupt(ds, exc) from None


def _corrupt(ds: h5py.Dataset, exc: BaseException,
             rows: tuple[int, int] | None = None) -> VislensError:
    """The error for an unreadable dataset: which file, condition and rows, and why."""
    path, name = ds.file.filename, ds.name
    if rows is None and ds.chunks is not None and ds.shape:
        step = ds.chunks[0]
        for a in range(0, ds.shape[0], step):
            try:
                ds[a:a + step]
            except IO_ERRORS:
                rows = (a, min(ds.shape[0], a + step) - 1)
                break
    where = name
    parts = name.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "conditions":
        where = f"condition {parts[1]!r} ({parts[2]})"
    if rows is not None:
        where += f", row {rows[0]}" if rows[0] == rows[1] else f", rows {rows[0]}-{rows[1]}"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return VislensError(f"{path}: cannot read {where}: the stored data is corrupted ({reason}); "
                        "recreate the file or restore it from a copy")


def _attr_value(value: Any) -> Any:
    """Python value -> what HDF5 stores; ``None`` -> not stored, dicts -> JSON text."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) \
            else list(value)
        if not items:
            return np.zeros(0, dtype=np.int64)
        if all(isinstance(v, str) for v in items):
            return np.array(items, dtype=h5py.string_dtype())
        if all(isinstance(v, (bool, np.bool_)) for v in items):
            return np.array(items, dtype=bool)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            return np.array(items, dtype=np.int64)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
            return np.array(items, dtype=np.float64)
        return json.dumps([_plain(v) for v in items], default=str)
    return str(value)


def _plain(value: Any) -> Any:
    """Stored attr value -> plain Python (str, bool, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _norm(value: Any) -> Any:
    """Comparable form of an attr value as it would read back from the file."""
    return _plain(_attr_value(value))


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        stored = _attr_value(value)
        if stored is not None:
            obj.attrs[key] = stored


def _read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _plain(v) for k, v in obj.attrs.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Runs of consecutive values in sorted ``rows``: (first row, stop row, offset in rows)."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [rows.size]))
    for a, b in zip(starts, stops):
        yield int(rows[a]), int(rows[b - 1]) + 1, int(a)


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, data: np.ndarray) -> None:
    """``ds[rows] = data`` for sorted unique rows, one slice write per consecutive run."""
    for start, stop, off in _runs(rows):
        ds[start:stop] = data[off:off + stop - start]


_F16_BIAS = np.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)
_F16_DENORM_MAGIC = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
_F16_DENORM_MAGIC_F = _F16_DENORM_MAGIC.reshape(1).view(np.float32)[0]


def _to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, bit-identical to ``astype`` (round to nearest even) but fast.

    Attention probabilities are mostly float16 subnormals, for which numpy's cast (and the
    CPU's conversion instruction) is ~5x slower; this does the rounding with integer ops
    and one float add, branch-free (F. Giesen's ``float_to_half_fast3_rtne``).
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    n = a >> 13  # normal range: round the mantissa to nearest even, rebias the exponent
    n &= np.uint32(1)
    n += a
    n += _F16_BIAS
    n >>= 13
    small = a < np.uint32(113 << 23)  # |x| < 2**-14: float16 subnormal or zero
    if small.any():
        sub = (a.view(np.float32) + _F16_DENORM_MAGIC_F).view(np.uint32)
        sub -= _F16_DENORM_MAGIC
        n = np.where(small, sub, n)
    big = a >= np.uint32(0x47800000)  # overflow to inf, or inf / nan
    if big.any():
        n[big] = np.where(a[big] > np.uint32(0x7F800000), np.uint32(0x7E00), np.uint32(0x7C00))
    sign = u >> 16
    sign &= np.uint32(0x8000)
    n |= sign
    return n.astype(np.uint16).view(np.float16).reshape(np.shape(x))


def _alloc(group: h5py.Group, name: str, dtype: Any, shape: tuple[int, ...],
           chunks: tuple[int, ...] | None = None) -> h5py.Dataset:
    """Create a dataset whose storage is allocated now and never zero-filled.

    Early allocation means no later write allocates chunks or changes the file's metadata;
    ``FILL_TIME_NEVER`` keeps creation fast (fresh file space reads as zeros on Linux).
    """
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    sid = h5py.h5s.create_simple(shape)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None and all(shape):
        dcpl.set_chunk(chunks)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    h5py.h5d.create(group.id, name.encode("utf-8"), tid, sid, dcpl=dcpl)
    return group[name]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path.parent)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def _tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 0


def _reserve(path: Path, shown: Path) -> None:
    """Give every byte of ``path`` real disk blocks now (``posix_fallocate``).

    The working file is created sparse (``FILL_TIME_NEVER``); without this a full disk
    would surface only when a batch is written, after hours of work. With it, a full disk
    fails here, before any sample is computed, and later in-place writes cannot run out of
    space (on copy-on-write filesystems they still can, and are then reported in one line).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # the filesystem cannot reserve: the free-space check is all there is
        free = _free_bytes(path)
        raise VislensError(f"{shown}: cannot reserve {human_bytes(size)} for the working file "
                           f"({os_reason(exc)}; {human_bytes(free)} free in {path.parent})"
                           ) from None
    finally:
        os.close(fd)


def _open_h5(path: Path, mode: str = "r", **kw: Any) -> h5py.File:
    """Open an existing capture file without HDF5's own file lock.

    ``FILE.lock`` already excludes a second writer; skipping HDF5's lock lets readers (in
    this process or any other, plain h5py included) open a file while a job writes it.
    """
    try:
        return h5py.File(path, mode, locking=False, **kw)
    except FileNotFoundError:
        raise VislensError(f"{path}: no such capture file") from None
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VislensError(f"{path}: cannot open as an HDF5 capture file ({msg})") from None


def _check_format(f: h5py.File, path: Path) -> None:
    fmt = _plain(f.attrs.get("format"))
    if fmt != FORMAT:
        raise VislensError(f"{path}: not a vislens capture file (format attr is {_short(fmt)}, "
                           f"expected {FORMAT!r})")
    version = _plain(f.attrs.get("format_version"))
    if version != FORMAT_VERSION:
        raise VislensError(f"{path}: capture format_version {_short(version)} is not supported "
                           f"(this vislens reads version {FORMAT_VERSION})")


def _done_matrix(f: h5py.File) -> np.ndarray:
    """[C, N] bool: done flags of every condition, in the file's condition order."""
    conds = list(f["conditions"])
    n = f["samples/id"].shape[0]
    if not conds:
        return np.zeros((0, n), dtype=bool)
    return np.stack([_values(f[f"conditions/{c}/done"]).astype(bool) for c in conds])


def _failed(f: h5py.File) -> np.ndarray:
    if "errors/failed" in f:
        return f["errors/failed"][()].astype(bool)
    return np.zeros(f["samples/id"].shape[0], dtype=bool)


# ----------------------------------------------------------------------------- lock


class _Lock:
    """Exclusive ``FILE.lock`` held with ``flock`` (the OS drops it when the process dies).

    ``target`` is resolved first (symlinks), so every job writing one real file takes the
    same lock. A missing or read-only folder is refused in one line.
    """

    def __init__(self, target: Path) -> None:
        shown = target
        target = real_path(target)
        check_folder(shown)
        self.path = target.with_name(target.name + ".lock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise VislensError(f"{shown}: cannot create the lock file {self.path} "
                                   f"({os_reason(exc)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise VislensError(f"{shown} is being written by another vislens job (pid {pid})")
            try:  # a releasing holder may have unlinked the file we opened: retry on the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:  # the pid is only for the "being written by" message; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlink while still holding the lock, so no one can lock a stale inode
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_output(path: str | Path) -> _Lock:
    """Take ``path``'s one-writer lock now (e.g. before loading a model); pass it to
    :meth:`CaptureWriter.open` as ``lock=``. Release with ``.release()``."""
    return _Lock(Path(path))


# ----------------------------------------------------------------------------- writer


class CaptureWriter:
    """Exclusive, crash-safe writer of one capture file (create or resume).

    Use :meth:`open`; write committed batches with :meth:`write_batch`, skipped samples
    with :meth:`write_failure`, then :meth:`finalize` and :meth:`close` (or use it as a
    context manager, which closes but does not finalize).
    """

    def __init__(self, path: Path, lock: _Lock, *, durable: bool) -> None:
        self.path = path  # as the caller named it (messages, return values)
        self._real = real_path(path)  # what is opened, locked and replaced
        self._lock = lock
        self._durable = durable
        self._f: h5py.File | None = None
        self._final = False
        self._closed = False
        self._broken: str | None = None  # set when a write failed: no further writes
        self._load()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, *, samples: Sequence["Sample"],
             conditions: Sequence["Condition"], grid: int, num_layers: int, num_heads: int,
             num_options: int, attrs: Mapping[str, Any],
             sample_index: Sequence[int] | None = None,
             sizes: Sequence[tuple[int, int] | None] | None = None,
             box_masks: np.ndarray | None = None,
             boxes: Sequence[Sequence["Box"]] | None = None,
             box_source: str = "annotations", durable: bool = False,
             lock: _Lock | None = None) -> "CaptureWriter":
        """Create ``path``, or resume it if it exists and matches this job's spec.

        Takes ``path.lock`` for the writer's lifetime (or adopts ``lock``, from
        :func:`lock_output`, taken earlier) and removes a leftover ``path.tmp``. A
        symlinked ``path`` is resolved: the lock, the writes and the final replace act on
        the real file, and the link stays a link. ``attrs`` must hold ``model``;
        ``model_revision``, ``dataset`` and ``command`` default to ``""``, ``""`` and this
        process's command line. ``durable`` fsyncs each batch's rows before its done flags
        (survives power loss, not only ``kill -9``). Resuming checks every sample's content
        fingerprint (question, options, answer, image bytes) against the file's.
        """
        path = Path(path)
        try:
            spec = _JobSpec.build(path, samples, conditions, grid, num_layers, num_heads,
                                  num_options, attrs, sample_index, sizes, box_masks, boxes,
                                  box_source)
            if lock is None:
                lock = _Lock(path)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        real = real_path(path)
        try:
            tmp = _tmp_of(real)
            if tmp.exists():
                tmp.unlink()
            if real.exists():
                with _open_h5(real) as f:
                    _check_format(f, path)
                    spec.check_resume(f, path)
            else:
                spec.create(real, shown=path)
            return cls(path, lock, durable=durable)
        except BaseException:
            lock.release()
            raise

    def _load(self) -> None:
        """(Re)open the file: read-write for a working file, read-only once complete.

        The read-write handle has no chunk cache: every row goes to the file inside the
        write call, so a failed write raises there (and is reported before any done flag
        is set) instead of surfacing when HDF5 evicts or closes, where h5py can only print
        it. Dataset handles stay open for the writer's lifetime for the same reason.
        """
        with _open_h5(self._real) as f:
            complete = bool(_plain(f.attrs.get("complete", False)))
        self._final = complete
        self._f = _open_h5(self._real, "r") if complete else _open_h5(self._real, "r+",
                                                                       rdcc_nbytes=0)
        f = self._f
        self._conds = list(f["conditions"])
        self._n = f["samples/id"].shape[0]
        self._grid = int(_plain(f.attrs["grid"])[0])
        self._L = int(_plain(f.attrs["num_layers"]))
        self._H = int(_plain(f.attrs["num_heads"]))
        self._K = int(_plain(f.attrs["num_options"]))
        self._done = _done_matrix(f)
        self._fail = _failed(f)
        self._ds: dict[str, h5py.Dataset] = {}
        if not complete:
            f.visititems(lambda name, obj: self._ds.__setitem__(name, obj)
                         if isinstance(obj, h5py.Dataset) else None)

    # ------------------------------------------------------------------ state

    def pending_indices(self) -> np.ndarray:
        """Rows (0..N-1) neither done in every condition nor failed, ascending."""
        return np.flatnonzero(~(self._done.all(axis=0) | self._fail))

    def _check_open(self, what: str) -> h5py.File:
        if self._closed or self._f is None:
            raise VislensError(f"{self.path}: {what} after close()")
        if self._final:
            raise VislensError(f"{self.path}: {what} on a complete (finalized) capture file")
        if self._broken:
            raise VislensError(f"{self.path}: {what} after a failed write ({self._broken}); "
                               "close the writer and resume")
        return self._f

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a failed write into one line; the writer refuses further writes after it.

        Whatever the failure left in the file is not marked done (done flags are written
        only after the rows they cover were written and flushed without error).
        """
        try:
            yield
        except IO_ERRORS as exc:
            self._broken = os_reason(exc)
            hint = "run the same command again to resume"
            if is_disk_full(exc):
                free = human_bytes(_free_bytes(self._real))
                hint = f"{free} free in {self._real.parent}; free disk space and {hint}"
            raise VislensError(f"{self.path}: writing {what} failed ({self._broken}); the "
                               f"samples written before are intact, {hint}") from None

    def _rows(self, rows: Sequence[int], what: str) -> np.ndarray:
        arr = np.asarray(rows, dtype=np.int64).ravel()
        bad = arr[(arr < 0) | (arr >= self._n)]
        if bad.size:
            raise VislensError(f"{self.path}: {what}: row {int(bad[0])} is out of range "
                               f"0..{self._n - 1}")
        if np.unique(arr).size != arr.size:
            raise VislensError(f"{self.path}: {what}: rows repeat")
        return arr

    def _commit_flush(self) -> None:
        assert self._f is not None
        self._f.flush()
        if self._durable:
            _fsync_path(self._real)

    # ------------------------------------------------------------------ writing

    def write_batch(self, rows: Sequence[int], results: Sequence[Mapping[str, "ConditionResult"]],
                    correct: Sequence[Mapping[str, bool]],
                    sizes: Sequence[tuple[int, int] | None] | None = None) -> None:
        """Write and commit every condition's results for ``rows`` (one dict per row).

        Rows already done are first un-committed, so a kill while overwriting them can
        never leave a done flag over partial data. A failed write (a full disk) raises a
        one-line VislensError before any done flag of the batch is set.
        """
        self._check_open("write_batch")
        rows = self._rows(rows, "write_batch")
        if not (len(results) == len(correct) == rows.size) or (sizes is not None
                                                                and len(sizes) != rows.size):
            raise VislensError(f"{self.path}: write_batch: rows, results, correct (and sizes) "
                               f"differ in length")
        if rows.size == 0:
            return
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        res = [results[i] for i in order]
        cor = [correct[i] for i in order]
        for r, d, c in zip(rows, res, cor):
            for name, what in ((set(d), "results"), (set(c), "correct")):
                if name != set(self._conds):
                    missing = sorted(set(self._conds) - name)
                    extra = sorted(name - set(self._conds))
                    raise VislensError(
                        f"{self.path}: write_batch row {r}: {what} "
                        + (f"lacks condition {missing[0]!r}" if missing
                           else f"has unknown condition {extra[0]!r}"))
        data = {c: self._condition_arrays(c, rows, res, cor) for c in self._conds}
        ds = self._ds

        with self._writing(f"rows {int(rows[0])}-{int(rows[-1])}"):
            # un-commit rows being rewritten (or previously failed)
            redo = self._done[:, rows].any(axis=0) | self._fail[rows]
            if redo.any():
                again = rows[redo]
                for ci, c in enumerate(self._conds):
                    _write_rows(ds[f"conditions/{c}/done"], again, np.zeros(again.size, dtype=bool))
                    self._done[ci, again] = False
                self._f.flush()
            for c, arrays in data.items():
                for field, values in arrays.items():
                    _write_rows(ds[f"conditions/{c}/{field}"], rows, values)
            first = [d[self._conds[0]] for d in res] if self._conds else []
            for name in ("n_image_tokens", "n_text_tokens"):
                _write_rows(ds[f"samples/{name}"], rows,
                            np.array([getattr(it, name, 0) for it in first], dtype=np.int32))
            if sizes is not None:
                wh = np.array([(0, 0) if s is None else tuple(s) for s in sizes],
                              dtype=np.int64)[order]
                _write_rows(ds["samples/width"], rows, wh[:, 0].astype(np.int32))
                _write_rows(ds["samples/height"], rows, wh[:, 1].astype(np.int32))
            self._commit_flush()  # rows are on disk before any done flag says so

            B = rows.size
            for ci, c in enumerate(self._conds):
                _write_rows(ds[f"conditions/{c}/done"], rows, np.ones(B, dtype=bool))
            if self._fail[rows].any():
                again = rows[self._fail[rows]]
                _write_rows(ds["errors/failed"], again, np.zeros(again.size, dtype=bool))
            self._f.flush()
        self._done[:, rows] = True
        self._fail[rows] = False

    def _condition_arrays(self, c: str, rows: np.ndarray, res: Sequence[Mapping[str, Any]],
                          cor: Sequence[Mapping[str, bool]]) -> dict[str, np.ndarray]:
        """The rows of condition ``c``'s datasets for one batch, validated, ready to write."""
        B, shape = rows.size, (self._L, self._H, self._grid, self._grid)
        items = [d[c] for d in res]
        attn = np.empty((B,) + shape, dtype=np.float16)
        img = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
        txt = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
        probs = np.full((B, self._K), np.nan, dtype=np.float32)
        for i, (r, item) in enumerate(zip(rows, items)):
            a = item.image_attention
            if a is None:
                attn[i] = np.nan
            else:
                a = np.asarray(a)
                if a.shape != shape:
                    raise VislensError(f"{self.path}: write_batch row {r} condition {c}: "
                                       f"image_attention shape {a.shape}, expected {shape}")
                attn[i] = a if a.dtype == np.float16 else _to_f16(a)
            for arr, value, name in ((img, item.image_mass, "image_mass"),
                                     (txt, item.text_mass, "text_mass")):
                if value is not None:
                    v = np.asarray(value)
                    if v.shape != arr.shape[1:]:
                        raise VislensError(f"{self.path}: write_batch row {r} condition {c}: "
                                           f"{name} shape {v.shape}, expected {arr.shape[1:]}")
                    arr[i] = v
            p = np.asarray(item.option_probs, dtype=np.float32).ravel()
            if p.size > self._K:
                raise VislensError(f"{self.path}: write_batch row {r} condition {c}: "
                                   f"{p.size} option_probs, file has num_options={self._K}")
            probs[i, :p.size] = p
        width = self._ds[f"conditions/{c}/prediction"].dtype.itemsize
        return {
            "image_attention": attn, "image_attention_mass": img, "text_attention_mass": txt,
            "option_probs": probs,
            "prediction": _fixed([it.text for it in items], width, PREDICTION_BYTES),
            "correct": np.array([bool(x[c]) for x in cor], dtype=bool),
            "confidence": np.array([it.confidence for it in items], dtype=np.float32),
            "alpha_used": np.array([it.alpha_used for it in items], dtype=np.float32),
        }

    def write_failure(self, row: int, reason: str) -> None:
        """Mark ``row`` as skipped (``--on-error skip``) with a one-line ``reason``."""
        self._check_open("write_failure")
        r = int(self._rows([row], "write_failure")[0])
        ds = self._ds
        with self._writing(f"the failure of row {r}"):
            if self._done[:, r].any():
                for ci, c in enumerate(self._conds):
                    ds[f"conditions/{c}/done"][r] = False
                    self._done[ci, r] = False
            width = ds["errors/reason"].dtype.itemsize
            ds["errors/reason"][r:r + 1] = _fixed([" ".join(str(reason).split())], width,
                                                  REASON_BYTES)
            self._f.flush()
            ds["errors/failed"][r] = True
            self._f.flush()
        self._fail[r] = True

    # ------------------------------------------------------------------ finishing

    def finalize(self) -> Path:
        """Compact the file once every sample is done or failed; else leave it as is.

        Writes ``FILE.tmp`` (compressed, variable-length strings, ``complete=True``) and
        atomically replaces ``FILE`` (the real file: a symlink stays a link); on any error
        the working file is left intact and the writer stays usable.
        """
        if self._closed or self._f is None:
            raise VislensError(f"{self.path}: finalize after close()")
        if self._final:
            return self.path
        self._check_open("finalize")
        if self.pending_indices().size:
            with self._writing("pending flags"):
                self._f.flush()
            return self.path
        with self._writing("the last batch"):
            self._close_file()
        tmp = _tmp_of(self._real)
        try:
            with _open_h5(self._real) as src:
                attrs = _read_attrs(src)
                attrs["complete"] = True
                n = src["samples/id"].shape[0]
                _build_final(tmp, [src], np.zeros(n, dtype=np.int64), np.arange(n), attrs)
            _fsync_path(tmp)
            os.replace(tmp, self._real)
            _fsync_dir(self._real)
        except BaseException as exc:
            _unlink_quietly(tmp)
            self._load()
            if isinstance(exc, IO_ERRORS):
                hint = "run the same command again (or finalize() again) to finish"
                if is_disk_full(exc):
                    hint = (f"{human_bytes(_free_bytes(self._real))} free in "
                            f"{self._real.parent}; free disk space and {hint}")
                raise VislensError(f"{self.path}: finalize failed ({os_reason(exc)}); the "
                                   f"working file is intact, {hint}") from None
            raise
        self._load()
        return self.path

    def _close_file(self) -> None:
        self._ds = {}
        if self._f is not None:
            f, self._f = self._f, None
            f.close()

    def close(self) -> None:
        """Flush, close the file and release the lock (idempotent).

        A failed flush raises a one-line VislensError, unless a failed write was already
        reported (the rows it concerns are not marked done either way).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._close_file()
        except IO_ERRORS as exc:
            if not self._broken:
                raise VislensError(f"{self.path}: closing the capture failed "
                                   f"({os_reason(exc)}); run the same command again to "
                                   "resume") from None
        finally:
            self._lock.release()

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self._final else f"{self.pending_indices().size} pending"
        return f"CaptureWriter({str(self.path)!r}, {self._n} samples, {state})"


class _JobSpec:
    """What a job will write: validated inputs, the working-file layout and resume checks."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    @classmethod
    def build(cls, path: Path, samples: Sequence["Sample"], conditions: Sequence["Condition"],
              grid: int, L: int, H: int, K: int, attrs: Mapping[str, Any],
              sample_index: Sequence[int] | None, sizes: Sequence[Any] | None,
              box_masks: np.ndarray | None, boxes: Sequence[Sequence["Box"]] | None,
              box_source: str) -> "_JobSpec":
        s = cls()
        n = len(samples)
        if n == 0:
            raise VislensError(f"{path}: no samples to capture")
        for name, v in (("grid", grid), ("num_layers", L), ("num_heads", H), ("num_options", K)):
            if int(v) < 1:
                raise VislensError(f"{path}: {name}={v} must be >= 1")
        s.n, s.grid, s.L, s.H, s.K = n, int(grid), int(L), int(H), int(K)
        names = [c.name for c in conditions]
        if not names:
            raise VislensError(f"{path}: no conditions to capture")
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise VislensError(f"{path}: two conditions are named {dup[0]!r}")
        for x in names:
            if not x or "/" in x or x in (".", ".."):
                raise VislensError(f"{path}: condition name {x!r} cannot be an HDF5 group name")
        s.conditions = [(c.name, dict(c.attrs())) for c in conditions]
        s.samples = list(samples)
        for smp in s.samples:
            if len(smp.options) > s.K:
                raise VislensError(f"{path}: sample {smp.id!r} has {len(smp.options)} options, "
                                   f"more than num_options={s.K}")
        s.ids = [str(smp.id) for smp in s.samples]
        if len(set(s.ids)) != n:
            dupe = next(x for x in s.ids if s.ids.count(x) > 1)
            raise VislensError(f"{path}: sample id {dupe!r} occurs more than once")
        s.fingerprints = [sample_fingerprint(smp) for smp in s.samples]
        s.index = np.arange(n, dtype=np.int64) if sample_index is None \
            else np.asarray(sample_index, dtype=np.int64).ravel()
        if s.index.size != n:
            raise VislensError(f"{path}: sample_index has {s.index.size} entries for {n} samples")
        s.sizes = np.zeros((n, 2), dtype=np.int32)
        if sizes is not None:
            if len(sizes) != n:
                raise VislensError(f"{path}: sizes has {len(sizes)} entries for {n} samples")
            for i, wh in enumerate(sizes):
                if wh is not None:
                    s.sizes[i] = (int(wh[0]), int(wh[1]))
        s.box_masks = None
        if box_masks is not None:
            m = np.asarray(box_masks, dtype=np.float32)
            if m.shape != (n, s.grid, s.grid):
                raise VislensError(f"{path}: box_masks shape {m.shape}, expected "
                                   f"{(n, s.grid, s.grid)}")
            s.box_masks = m
        if boxes is not None and len(boxes) != n:
            raise VislensError(f"{path}: boxes has {len(boxes)} entries for {n} samples")
        s.boxes = boxes
        s.box_source = str(box_source)

        owned = {"format": FORMAT, "format_version": FORMAT_VERSION, "grid": [s.grid, s.grid],
                 "num_layers": s.L, "num_heads": s.H, "num_options": s.K, "complete": False}
        for key in _STORE_OWNED:
            if key in attrs and attrs[key] is not None and _norm(attrs[key]) != _norm(owned[key]) \
                    and not (key == "grid" and _norm(attrs[key]) == s.grid):
                raise VislensError(f"{path}: attrs[{key!r}]={_short(attrs[key])} conflicts with "
                                   f"the store's value {_short(owned[key])}")
        if not attrs.get("model"):
            raise VislensError(f"{path}: attrs must name the model (attrs['model'])")
        from . import __version__

        root: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": "",
            "model_revision": "", "vislens_version": __version__, "grid": [s.grid, s.grid],
            "num_layers": s.L, "num_heads": s.H, "num_options": s.K,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(sys.argv), "dataset": "", "complete": False,
        }
        for key, value in attrs.items():
            if key not in _STORE_OWNED and not (value is None and key in root):
                root[key] = value
        s.attrs = root
        return s

    # ------------------------------------------------------------------ resume

    def check_resume(self, f: h5py.File, path: Path) -> None:
        """Raise a one-line VislensError at the first field where ``f`` differs from this job."""

        def differ(field: str, have: Any, want: Any) -> None:
            raise VislensError(f"{path}: cannot resume: {field} is {_short(have)} in the file "
                               f"but {_short(want)} in this job")

        fa = _read_attrs(f)
        for key in _SPEC_FIELDS:
            if fa.get(key) != _norm(self.attrs[key]):
                differ(key, fa.get(key), _norm(self.attrs[key]))
        n = f["samples/id"].shape[0]
        if n != self.n:
            differ("number of samples", n, self.n)
        ids = _text(f["samples/id"])
        for i, (a, b) in enumerate(zip(ids, self.ids)):
            if a != b:
                differ(f"samples/id[{i}]", a, b)
        index = f["samples/index"][()]
        bad = np.flatnonzero(index != self.index)
        if bad.size:
            i = int(bad[0])
            differ(f"samples/index[{i}]", int(index[i]), int(self.index[i]))
        self._check_content(f, path, ids, differ)
        have = list(f["conditions"])
        want = [c for c, _ in self.conditions]
        if sorted(have) != sorted(want):
            differ("conditions", have, want)
        for name, cattrs in self.conditions:
            stored = _read_attrs(f[f"conditions/{name}"])
            for key in sorted(set(stored) | set(cattrs)):
                if stored.get(key) != _norm(cattrs.get(key)):
                    differ(f"conditions/{name} attr {key}", stored.get(key), _norm(cattrs.get(key)))
        keys = (set(fa) | set(self.attrs)) - set(_SPEC_FIELDS) - set(_STORE_OWNED) \
            - RESUME_IGNORED_ATTRS
        for key in sorted(keys):
            if fa.get(key) != _norm(self.attrs.get(key)):
                differ(f"attr {key}", fa.get(key), _norm(self.attrs.get(key)))

    def _check_content(self, f: h5py.File, path: Path, ids: np.ndarray, differ: Any) -> None:
        """Samples must hold what they held when the file was made (same ids, edited JSONL
        or replaced images are refused): question, answer, options compared as stored, the
        image through the content fingerprint. A file without ``/samples/fingerprint``
        (vislens < 0.2) is checked on the stored text only."""
        for name in ("question", "answer"):
            stored = _text(f[f"samples/{name}"])
            for i, smp in enumerate(self.samples):
                if stored[i] != str(getattr(smp, name)):
                    differ(f"samples/{name}[{i}] (sample {ids[i]!r})", stored[i],
                           str(getattr(smp, name)))
        stored_opts = _text(f["samples/options"])
        for i, smp in enumerate(self.samples):
            have, want = _trim(list(stored_opts[i])), [str(o) for o in smp.options]
            if have != want:
                differ(f"samples/options[{i}] (sample {ids[i]!r})", have, want)
        if "samples/fingerprint" not in f:
            return
        stored = _text(f["samples/fingerprint"])
        for i, smp in enumerate(self.samples):
            if stored[i] != self.fingerprints[i]:
                raise VislensError(
                    f"{path}: cannot resume: the image of sample {ids[i]!r} (row {i}, "
                    f"{smp.image_path}) is not the one the file was made from (its content "
                    "fingerprint differs); restore it or write a new file")

    # ------------------------------------------------------------------ create

    def create(self, path: Path, shown: Path | None = None) -> None:
        """Build the complete working file as ``path.tmp``, reserve its disk blocks and
        atomically move it to ``path`` (``shown`` names it in messages)."""
        n, K = self.n, self.K
        shown = path if shown is None else shown
        text = {name: [str(getattr(smp, name)) for smp in self.samples]
                for name in SAMPLE_TEXT_FIELDS}
        opts = [[str(o) for o in smp.options] + [""] * (K - len(smp.options))
                for smp in self.samples]
        widths = {name: max(1, max(len(_utf8(v)) for v in vals)) for name, vals in text.items()}
        widths["options"] = max(1, max(len(_utf8(o)) for row in opts for o in row))
        check_free_space(shown, working_file_bytes(self.samples, len(self.conditions), self.grid,
                                                   self.L, self.H, self.K), "the working file")
        tmp = _tmp_of(path)
        try:
            with h5py.File(tmp, "w") as f:
                _set_attrs(f, self.attrs)
                gs = f.create_group("samples")
                for name, vals in text.items():
                    _alloc(gs, name, h5py.string_dtype("utf-8", widths[name]), (n,))[...] = \
                        _fixed(vals, widths[name])
                ds = _alloc(gs, "options", h5py.string_dtype("utf-8", widths["options"]), (n, K))
                ds[...] = _fixed([o for row in opts for o in row], widths["options"]).reshape(n, K)
                _alloc(gs, "index", np.int64, (n,))[...] = self.index
                _alloc(gs, "width", np.int32, (n,))[...] = self.sizes[:, 0]
                _alloc(gs, "height", np.int32, (n,))[...] = self.sizes[:, 1]
                for name in ("n_image_tokens", "n_text_tokens"):
                    _alloc(gs, name, np.int32, (n,))[...] = np.zeros(n, dtype=np.int32)
                _alloc(gs, "fingerprint", h5py.string_dtype("utf-8", FINGERPRINT_CHARS), (n,))[...] = \
                    _fixed(self.fingerprints, FINGERPRINT_CHARS)

                ge = f.create_group("errors")
                _alloc(ge, "failed", bool, (n,))[...] = np.zeros(n, dtype=bool)
                _alloc(ge, "reason", h5py.string_dtype("utf-8", REASON_BYTES), (n,))[...] = \
                    _fixed([""] * n, REASON_BYTES)

                gc = f.create_group("conditions", track_order=True)
                G, L, H = self.grid, self.L, self.H
                for name, cattrs in self.conditions:
                    g = gc.create_group(name)
                    _set_attrs(g, cattrs)
                    _alloc(g, "image_attention", np.float16, (n, L, H, G, G), (1, L, H, G, G))
                    _alloc(g, "image_attention_mass", np.float32, (n, L, H))
                    _alloc(g, "text_attention_mass", np.float32, (n, L, H))
                    _alloc(g, "prediction", h5py.string_dtype("utf-8", PREDICTION_BYTES), (n,))
                    _alloc(g, "correct", bool, (n,))
                    _alloc(g, "confidence", np.float32, (n,))
                    _alloc(g, "alpha_used", np.float32, (n,))
                    _alloc(g, "option_probs", np.float32, (n, K))
                    _alloc(g, "done", bool, (n,))[...] = np.zeros(n, dtype=bool)

                if self.box_masks is not None or self.boxes is not None:
                    _write_boxes(f, self.box_masks, self.boxes, self.box_source, fixed=True)
            _reserve(tmp, shown)
            _fsync_path(tmp)
            os.replace(tmp, path)
            _fsync_dir(path)
        except IO_ERRORS as exc:
            _unlink_quietly(tmp)
            raise VislensError(f"{shown}: cannot create the working file ({os_reason(exc)}; "
                               f"{human_bytes(_free_bytes(path))} free in {path.parent})"
                               ) from None
        except BaseException:
            _unlink_quietly(tmp)
            raise


def working_file_bytes(samples: Sequence["Sample"], n_conditions: int, grid: int,
                       num_layers: int, num_heads: int, num_options: int) -> int:
    """Upper bound of a working file's size (the disk space a capture job reserves)."""
    n, L, H, G, K = len(samples), num_layers, num_heads, grid, num_options
    widths = sum(max([1] + [len(_utf8(getattr(smp, name))) for smp in samples])
                 for name in SAMPLE_TEXT_FIELDS)
    widths += max([1] + [len(_utf8(o)) for smp in samples for o in smp.options]) * K
    per_cond = n * (L * H * (G * G * 2 + 8) + K * 4 + PREDICTION_BYTES + 10)
    per_sample = widths + REASON_BYTES + FINGERPRINT_CHARS + 64
    return n_conditions * per_cond + n * per_sample + (1 << 20)


def sample_fingerprint(sample: "Sample") -> str:
    """sha256 (hex) of what a sample's results depend on: question, options, answer and the
    image file's bytes (an unreadable image hashes as such). Stored as
    ``/samples/fingerprint``; a resume refuses samples whose fingerprint changed."""
    h = hashlib.sha256()
    for part in (sample.question, "\x1f".join(map(str, sample.options)), sample.answer):
        b = str(part).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    try:
        with open(sample.image_path, "rb") as fh:
            h.update(b"image:" + hashlib.file_digest(fh, "sha256").digest())
    except (OSError, TypeError, ValueError):
        h.update(b"no-image")
    return h.hexdigest()


def _write_boxes(f: h5py.File, masks: np.ndarray | None, boxes: Sequence[Sequence["Box"]] | None,
                 source: str, *, fixed: bool) -> None:
    """Write ``/boxes`` (at creation: preallocated, fixed-length labels)."""
    gb = f.create_group("boxes")
    gb.attrs["source"] = source
    if masks is not None:
        _alloc(gb, "mask", np.float32, masks.shape)[...] = masks
    rows, labels, xyxy, score = [], [], [], []
    for i, bs in enumerate(boxes or []):
        for b in bs:
            rows.append(i)
            labels.append(str(b.label))
            xyxy.append(tuple(float(v) for v in b.xyxy))
            score.append(float(getattr(b, "score", 1.0)))
    m = len(rows)
    width = max([1] + [len(_utf8(x)) for x in labels])
    _alloc(gb, "sample", np.int64, (m,))[...] = np.asarray(rows, dtype=np.int64)
    ds = _alloc(gb, "label", h5py.string_dtype("utf-8", width), (m,))
    if m:
        ds[...] = _fixed(labels, width)
    _alloc(gb, "xyxy", np.float32, (m, 4))[...] = np.asarray(xyxy, dtype=np.float32).reshape(m, 4)
    _alloc(gb, "score", np.float32, (m,))[...] = np.asarray(score, dtype=np.float32)


# ----------------------------------------------------------------------------- compaction


def _shuffle_deflate(arr: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters would store it (releases the GIL)."""
    raw = np.ascontiguousarray(arr)
    size = raw.dtype.itemsize
    shuffled = raw.view(np.uint8).reshape(-1, size).T.tobytes() if size > 1 else raw.tobytes()
    return zlib.compress(shuffled, level)


def _is_final_attention(ds: h5py.Dataset) -> bool:
    """Whether ``ds``'s chunks are stored exactly as the final file stores them."""
    if ds.chunks != (1,) + ds.shape[1:] or ds.dtype != np.float16:
        return False
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    return filters == [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]


def _gather(sources: Sequence[h5py.File], name: str, src_of: np.ndarray,
            row_of: np.ndarray) -> np.ndarray:
    """Output rows of dataset ``name``: row ``r`` = ``sources[src_of[r]][name][row_of[r]]``."""
    first = sources[0][name]
    is_text = h5py.check_string_dtype(first.dtype) is not None
    out = np.empty((src_of.size,) + first.shape[1:], dtype=object if is_text else first.dtype)
    for s, src in enumerate(sources):
        sel = src_of == s
        if sel.any():
            data = _text(src[name]) if is_text else src[name][()]
            out[sel] = data[row_of[sel]]
    return out


def _final_dataset(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """A compressed (numeric) or variable-length utf-8 (text) dataset of the final file."""
    if data.dtype == object:
        g.create_dataset(name, data=data.astype(object), dtype=h5py.string_dtype())
    elif data.size:
        g.create_dataset(name, data=data, compression="gzip", compression_opts=GZIP_LEVEL,
                         shuffle=data.dtype.itemsize > 1)
    else:
        g.create_dataset(name, data=data)


def _build_final(dst: Path, sources: Sequence[h5py.File], src_of: np.ndarray,
                 row_of: np.ndarray, attrs: Mapping[str, Any], *, with_boxes: bool = True) -> None:
    """Write a final (compact, ``complete``) capture file from rows of one or more sources.

    Output row ``r`` is row ``row_of[r]`` of ``sources[src_of[r]]``. Values of rows that
    are not done in a condition are written as NaN / "" / False.
    """
    n = src_of.size
    f0 = sources[0]
    conds = list(f0["conditions"])
    with h5py.File(dst, "w") as out:
        _set_attrs(out, attrs)
        gs = out.create_group("samples")
        names = [*SAMPLE_TEXT_FIELDS, "options", "index", "width", "height",
                 "n_image_tokens", "n_text_tokens"]
        if all("samples/fingerprint" in src for src in sources):
            names.append("fingerprint")
        for name in names:
            _final_dataset(gs, name, _gather(sources, f"samples/{name}", src_of, row_of))
        ge = out.create_group("errors")
        failed = _gather(sources, "errors/failed", src_of, row_of).astype(bool)
        reason = _gather(sources, "errors/reason", src_of, row_of)
        _final_dataset(ge, "failed", failed)
        _final_dataset(ge, "reason", reason)

        gc = out.create_group("conditions", track_order=True)
        for c in conds:
            g = gc.create_group(c)
            for key, value in f0[f"conditions/{c}"].attrs.items():
                g.attrs[key] = value
            name = f"conditions/{c}"
            done = _gather(sources, f"{name}/done", src_of, row_of).astype(bool)
            for field, blank in (("image_attention_mass", np.nan), ("text_attention_mass", np.nan),
                                 ("option_probs", np.nan), ("confidence", np.nan),
                                 ("alpha_used", np.nan), ("correct", False), ("prediction", "")):
                data = _gather(sources, f"{name}/{field}", src_of, row_of)
                data[~done] = blank
                _final_dataset(g, field, data)
            _final_dataset(g, "done", done)
            _copy_attention(g, sources, name, src_of, row_of, done)

        src_boxes = ["boxes" in s for s in sources]
        if with_boxes and any(src_boxes):
            _final_boxes(out, sources, src_of, row_of)


def _copy_attention(g: h5py.Group, sources: Sequence[h5py.File], name: str,
                    src_of: np.ndarray, row_of: np.ndarray, done: np.ndarray) -> None:
    """Stream ``image_attention`` into ``g``: compress chunks on a thread pool and write them
    directly, or copy already-compressed chunks byte for byte."""
    src_ds = [s[f"{name}/image_attention"] for s in sources]
    shape = (src_of.size,) + src_ds[0].shape[1:]
    per_row = shape[1:]
    out = g.create_dataset("image_attention", shape=shape, dtype=np.float16,
                           chunks=(1,) + per_row, compression="gzip",
                           compression_opts=GZIP_LEVEL, shuffle=True)
    if src_of.size == 0:
        return
    raw_ok = [_is_final_attention(d) for d in src_ds]
    blank = _shuffle_deflate(np.full(per_row, np.nan, dtype=np.float16))
    zero_off = (0,) * len(per_row)
    workers = max(1, min(8, os.cpu_count() or 1))
    pending: deque[tuple[int, list[Any]]] = deque()

    def flush_one() -> None:
        start, items = pending.popleft()
        for k, item in enumerate(items):
            data = item if isinstance(item, bytes) else item.result()
            out.id.write_direct_chunk((start + k,) + zero_off, data)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, src_of.size, _BLOCK):
            b1 = min(src_of.size, b0 + _BLOCK)
            items: list[Any] = [blank] * (b1 - b0)
            need: dict[int, list[int]] = {}
            for r in range(b0, b1):
                s, j = int(src_of[r]), int(row_of[r])
                if not done[r]:
                    continue
                if raw_ok[s]:
                    mask, data = src_ds[s].id.read_direct_chunk((j,) + zero_off)
                    if mask == 0:
                        items[r - b0] = data
                        continue
                need.setdefault(s, []).append(r)
            for s, rs in need.items():
                rs_arr = np.asarray(rs)
                src_rows = row_of[rs_arr]
                order = np.argsort(src_rows)
                for start, stop, off in _runs(src_rows[order]):
                    block = src_ds[s][start:stop]
                    for k in range(stop - start):
                        r = int(rs_arr[order[off + k]])
                        items[r - b0] = pool.submit(_shuffle_deflate, block[k])
            pending.append((b0, items))
            if len(pending) > 2:
                flush_one()
        while pending:
            flush_one()


def _final_boxes(out: h5py.File, sources: Sequence[h5py.File], src_of: np.ndarray,
                 row_of: np.ndarray) -> None:
    """``/boxes`` of the final file, box sample numbers remapped to output rows."""
    gb = out.create_group("boxes")
    gb.attrs["source"] = _plain(sources[0]["boxes"].attrs.get("source", "annotations"))
    if all("boxes/mask" in s for s in sources):
        _final_dataset(gb, "mask", _gather(sources, "boxes/mask", src_of, row_of))
    new_row = []
    for s, src in enumerate(sources):
        inv = np.full(src["samples/id"].shape[0], -1, dtype=np.int64)
        sel = np.flatnonzero(src_of == s)
        inv[row_of[sel]] = sel
        new_row.append(inv)
    sample, cols = _remapped_records(sources, new_row, "sample", ("label", "xyxy", "score"))
    _final_dataset(gb, "sample", sample)
    _final_dataset(gb, "label", cols["label"].astype(object))
    _final_dataset(gb, "xyxy", cols["xyxy"].astype(np.float32))
    _final_dataset(gb, "score", cols["score"].astype(np.float32))
    # question objects the detector found no box for (``vislens boxes --detector yolo``)
    if any("boxes/unmatched_sample" in src for src in sources):
        sample, cols = _remapped_records(sources, new_row, "unmatched_sample",
                                         ("unmatched_label", "unmatched_reason"))
        _final_dataset(gb, "unmatched_sample", sample)
        for name, data in cols.items():
            _final_dataset(gb, name, data.astype(object))


def _remapped_records(sources: Sequence[h5py.File], new_row: Sequence[np.ndarray],
                      sample_key: str, fields: Sequence[str]
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-record datasets of ``/boxes`` from every source that has them: sample numbers
    mapped to output rows (``new_row[s]``, -1 = row dropped, record left out), sorted by row."""
    samples: list[np.ndarray] = []
    cols: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    for s, src in enumerate(sources):
        if f"boxes/{sample_key}" not in src:
            continue
        b = src["boxes"]
        mapped = new_row[s][b[sample_key][()].astype(np.int64)]
        keep = mapped >= 0
        samples.append(mapped[keep])
        for f in fields:
            text = h5py.check_string_dtype(b[f].dtype) is not None
            cols[f].append((_text(b[f]) if text else b[f][()])[keep])
    sample = np.concatenate(samples)
    order = np.argsort(sample, kind="stable")
    return sample[order], {f: np.concatenate(v)[order] for f, v in cols.items()}


def replace_boxes(path: str | Path, masks: np.ndarray, boxes: Sequence[Sequence[Any]],
                  source: str, unmatched: Sequence[Sequence[Any]] | None = None, *,
                  lock: _Lock | None = None) -> Path:
    """Replace ``/boxes`` of a complete capture, atomically (``FILE.tmp`` + ``os.replace``).

    ``boxes[i]`` are objects with ``label``, ``xyxy`` (and ``score``) for sample row ``i``;
    ``unmatched[i]`` objects with ``label`` and ``reason`` (question objects without a box)
    go to ``/boxes/unmatched_{sample,label,reason}``. The capture's other content is copied
    chunk for chunk; a kill at any moment leaves either the old or the new file, and a full
    disk leaves the old one (one-line error). ``lock`` (from :func:`lock_output`, taken
    before a slow detection) is adopted and released.
    """
    path = Path(path)
    lock = _Lock(path) if lock is None else lock
    real = real_path(path)
    tmp = _tmp_of(real)
    try:
        with _open_h5(real) as src:
            _check_format(src, path)
            attrs = _read_attrs(src)
            if not attrs.get("complete"):
                raise VislensError(f"{path}: the capture is not complete; finish (resume) the "
                                   "capture job before adding boxes")
            n = src["samples/id"].shape[0]
            if masks.shape[0] != n or len(boxes) != n:
                raise VislensError(f"{path}: {masks.shape[0]} masks / {len(boxes)} box lists for "
                                   f"{n} samples")
            with _writing_file(path, "writing the boxes", real):
                _build_final(tmp, [src], np.zeros(n, dtype=np.int64), np.arange(n), attrs,
                             with_boxes=False)
        with _writing_file(path, "writing the boxes", real):
            with h5py.File(tmp, "r+", locking=False) as f:
                _write_boxes(f, masks.astype(np.float32), boxes, source, fixed=False)
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
            _fsync_path(tmp)
            os.replace(tmp, real)
            _fsync_dir(real)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        lock.release()
    return path


@contextmanager
def _writing_file(shown: Path, what: str, real: Path) -> Iterator[None]:
    """A failed write of a whole new file (a full disk) -> one line naming it and the space."""
    try:
        yield
    except IO_ERRORS as exc:
        extra = ""
        if is_disk_full(exc):
            extra = f"; {human_bytes(_free_bytes(real))} free in {real.parent}"
        raise VislensError(f"{shown}: {what} failed ({os_reason(exc)}{extra}); "
                           f"{shown} is left as it was") from None


# ----------------------------------------------------------------------------- merge


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
    value = _plain(f.attrs.get("shard"))
    if value is None or value == "":
        return None
    try:
        return parse_shard(value)
    except VislensError:
        raise VislensError(f"{path}: merge: malformed shard attr {_short(value)} "
                           "(expected \"I/N\")") from None


def merge(out: str | Path, shards: Sequence[str | Path], *, force: bool = False) -> Path:
    """Combine shard captures of one job into one final file ordered by ``/samples/index``.

    Every shard must have the same spec (model, grid, shapes, conditions and their attrs,
    other attrs except ``shard``/``command``/...), be complete (every sample done or
    failed), and no dataset position may occur twice. With a ``shard`` attr like
    ``"2/4"`` every shard 0..n-1 must be given; with a ``total_samples`` attr the shards
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
    lock = _Lock(out)
    files: list[h5py.File] = []
    tmp = _tmp_of(real)
    try:
        for p in paths:
            f = _open_h5(p)
            files.append(f)
            _check_format(f, p)
        ref = _merge_spec(files[0])
        for p, f in zip(paths[1:], files[1:]):
            spec = _merge_spec(f)
            for key in sorted(set(ref) | set(spec), key=lambda k: (k != "conditions", k)):
                if ref.get(key) != spec.get(key):
                    raise VislensError(f"{p}: merge: {key} is {_short(spec.get(key))} but "
                                       f"{_short(ref.get(key))} in {paths[0]}")
        shard_ids = [_shard_attr(f, p) for p, f in zip(paths, files)]
        if all(s is not None for s in shard_ids):
            counts = {s[1] for s in shard_ids if s}
            seen: dict[int, Path] = {}
            for p, s in zip(paths, shard_ids):
                assert s is not None
                if s[0] in seen:
                    raise VislensError(f"{p}: merge: shard {s[0]}/{s[1]} given twice "
                                       f"(also {seen[s[0]]})")
                seen[s[0]] = p
            n_shards = counts.pop() if len(counts) == 1 else None
            if n_shards is not None and len(seen) != n_shards:
                base = 0  # --shard I/N is 0-based
                missing = [i for i in range(base, base + n_shards) if i not in seen]
                raise VislensError(f"{out}: merge: missing shard(s) "
                                   f"{', '.join(f'{i}/{n_shards}' for i in missing)} "
                                   f"(got {len(seen)} of {n_shards})")
        for p, f in zip(paths, files):
            pending = np.flatnonzero(~(_done_matrix(f).all(axis=0) | _failed(f)))
            if pending.size:
                ids = _text(f["samples/id"], pending[:3].tolist())
                raise VislensError(f"{p}: merge: {pending.size} sample(s) not done (e.g. "
                                   f"{', '.join(map(str, ids))}); resume that shard first")
        owner: dict[int, int] = {}
        src_list, row_list, idx_list = [], [], []
        for s, (p, f) in enumerate(zip(paths, files)):
            idx = f["samples/index"][()]
            for j, i in enumerate(idx.tolist()):
                if i in owner:
                    other = paths[owner[i]]
                    raise VislensError(f"{p}: merge: sample index {i} (id "
                                       f"{str(_text(f['samples/id'], j))!r}) is also in {other}")
                owner[i] = s
            src_list.append(np.full(idx.size, s, dtype=np.int64))
            row_list.append(np.arange(idx.size, dtype=np.int64))
            idx_list.append(idx)
        index = np.concatenate(idx_list)
        total = _plain(files[0].attrs.get("total_samples"))
        if isinstance(total, int) and index.size != total:
            raise VislensError(f"{out}: merge: shards hold {index.size} samples but "
                               f"total_samples is {total}")
        order = np.argsort(index, kind="stable")
        src_of = np.concatenate(src_list)[order]
        row_of = np.concatenate(row_list)[order]
        attrs = _read_attrs(files[0])
        attrs.pop("shard", None)
        attrs["complete"] = True
        attrs["merged_from"] = [p.name for p in paths]
        with _writing_file(out, "merge", real):
            _build_final(tmp, files, src_of, row_of, attrs)
            for f in files:
                f.close()
            files.clear()
            _fsync_path(tmp)
            os.replace(tmp, real)
            _fsync_dir(real)
        return out
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        for f in files:
            f.close()
        lock.release()


def _merge_spec(f: h5py.File) -> dict[str, Any]:
    """What must agree between shards of one job."""
    attrs = {k: v for k, v in _read_attrs(f).items() if k not in _MERGE_IGNORED}
    spec: dict[str, Any] = {f"attr {k}": v for k, v in attrs.items()}
    spec["conditions"] = list(f["conditions"])
    for c in f["conditions"]:
        spec[f"conditions/{c} attrs"] = _read_attrs(f[f"conditions/{c}"])
    spec["/boxes present"] = "boxes" in f
    spec["/boxes/mask present"] = "boxes/mask" in f
    if "boxes" in f:
        spec["/boxes source"] = _plain(f["boxes"].attrs.get("source"))
    return spec


# ----------------------------------------------------------------------------- reader


def open_capture(path: str | Path) -> "Capture":
    """Open a capture file (working or final, even while a job writes it) read-only."""
    return Capture(path)


class Capture:
    """Read-only view of a capture file; attention is read lazily, slice by slice.

    Rows of a condition that are not (yet) done read as NaN (attention, masses) and are
    left out of :meth:`table` unless ``done_only=False``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = _open_h5(self.path)
        try:
            _check_format(self._f, self.path)
            self.attrs: dict[str, Any] = _read_attrs(self._f)
            self.conditions: list[str] = list(self._f["conditions"])
            self._n = self._f["samples/id"].shape[0]
            self._static: pd.DataFrame | None = None
        except BaseException:
            self._f.close()
            raise

    # ------------------------------------------------------------------ metadata

    def __len__(self) -> int:
        return self._n

    def _group(self, condition: str) -> h5py.Group:
        if condition not in self.conditions:
            raise VislensError(f"{self.path}: no condition {condition!r} (have "
                               f"{', '.join(self.conditions)})")
        return self._f[f"conditions/{condition}"]

    def condition_attrs(self, name: str) -> dict[str, Any]:
        """The condition's attrs (method, spec and parameters) as plain Python values."""
        return _read_attrs(self._group(name))

    def done(self, condition: str) -> np.ndarray:
        """[N] bool: rows whose results for ``condition`` are complete."""
        return _values(self._group(condition)["done"]).astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def n_samples(self) -> int:
        """Samples in the file (done, failed or still pending)."""
        return self._n

    @property
    def n_done(self) -> int:
        """Samples done in every condition (what a complete file has for all but failed ones)."""
        return int(_done_matrix(self._f).all(axis=0).sum()) if self.conditions else 0

    @property
    def n_failed(self) -> int:
        """Samples skipped with ``--on-error skip`` (no results)."""
        return int(_failed(self._f).sum())

    def progress_line(self) -> str:
        """One line for report headers: ``"16 samples"`` for a complete file,
        ``"8 of 16 samples done (unfinished capture)"`` for a working one (plus failures)."""
        failed = self.n_failed
        tail = f", {failed} failed" if failed else ""
        if self.complete:
            return f"{self._n} samples{tail}"
        return f"{self.n_done} of {self._n} samples done (unfinished capture{tail})"

    @property
    def samples(self) -> pd.DataFrame:
        """One row per sample: text fields, options (list), index, width, height, token counts
        (``n_image_tokens``, ``n_text_tokens``; 0 when unknown), failed, reason."""
        f = self._f
        if self._static is None:
            cols: dict[str, Any] = {name: _text(f[f"samples/{name}"])
                                    for name in SAMPLE_TEXT_FIELDS}
            opts = _text(f["samples/options"])
            cols["options"] = [_trim(list(row)) for row in opts]
            cols["index"] = _values(f["samples/index"]).astype(np.int64)
            self._static = pd.DataFrame(cols)
        df = self._static.copy()
        df["width"] = _values(f["samples/width"]).astype(np.int32)
        df["height"] = _values(f["samples/height"]).astype(np.int32)
        for name in ("n_image_tokens", "n_text_tokens"):
            ds = f.get(f"samples/{name}")
            df[name] = ds[()].astype(np.int32) if ds is not None else np.zeros(len(df), np.int32)
        df["failed"] = _failed(f)
        df["reason"] = _text(f["errors/reason"]) if "errors/reason" in f else ""
        return df

    # ------------------------------------------------------------------ tables

    def table(self, conditions: Sequence[str] | None = None, done_only: bool = True
              ) -> pd.DataFrame:
        """Tidy results: one row per sample and condition.

        Columns: row, index, id, condition, method, prediction, correct, confidence,
        alpha_used, relation, group, answer, split, (done, when ``done_only=False``), then
        ``p_<option>`` per distinct option when there are at most 16 distinct options,
        else one ``option_probs`` list column (the sample's options only).
        """
        names = self.conditions if conditions is None else list(conditions)
        smp = self.samples
        opts = smp["options"].tolist()
        vocab = list(dict.fromkeys(o for row in opts for o in row))
        per_option = len(vocab) <= 16 and all(len(set(row)) == len(row) for row in opts)
        col = {o: i for i, o in enumerate(vocab)}
        # (sample, option slot, vocabulary column) of every stored option
        where = np.array([(i, k, col[o]) for i, row in enumerate(opts) for k, o in enumerate(row)],
                         dtype=np.int64).reshape(-1, 3).T
        frames = []
        for c in names:
            g = self._group(c)
            done = _values(g["done"]).astype(bool)
            keep = np.flatnonzero(done) if done_only else np.arange(self._n)
            probs = _values(g["option_probs"]).astype(np.float32)
            pred = _text(g["prediction"])
            corr = _values(g["correct"]).astype(bool)
            conf = _values(g["confidence"]).astype(np.float32)
            alpha = _values(g["alpha_used"]).astype(np.float32)
            pred[~done], corr[~done], conf[~done], alpha[~done] = "", False, np.nan, np.nan
            probs[~done] = np.nan
            method = str(_plain(g.attrs.get("method", "")))
            df = pd.DataFrame({
                "row": keep, "index": smp["index"].to_numpy()[keep],
                "id": smp["id"].to_numpy()[keep], "condition": c, "method": method,
                "prediction": pred[keep], "correct": corr[keep], "confidence": conf[keep],
                "alpha_used": alpha[keep], "relation": smp["relation"].to_numpy()[keep],
                "group": smp["group"].to_numpy()[keep], "answer": smp["answer"].to_numpy()[keep],
                "split": smp["split"].to_numpy()[keep],
            })
            if not done_only:
                df["done"] = done[keep]
            if per_option:
                table = np.full((self._n, len(vocab)), np.nan, dtype=np.float32)
                table[where[0], where[2]] = probs[where[0], where[1]]
                for i, o in enumerate(vocab):
                    df[f"p_{o}"] = table[keep, i]
            else:
                df["option_probs"] = [probs[i, :len(opts[i])].tolist() for i in keep]
            frames.append(df)
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ arrays

    def attention(self, condition: str, rows: Sequence[int] | np.ndarray | None = None,
                  layers: int | Sequence[int] | slice | None = None, *,
                  out: np.ndarray | None = None) -> np.ndarray:
        """``[n, L', H, G, G]`` float32 answer-position attention over the grid.

        ``rows`` (any order, repeats allowed, bool mask ok) default to all rows; rows not
        done read as NaN. ``layers`` selects layers (an int keeps the layer axis). ``out``,
        a C-contiguous float32 array of the result's shape, receives the result (reusing
        one buffer across reads avoids paying for fresh memory on every chunk).
        """
        g = self._group(condition)
        ds = g["image_attention"]
        n, L = ds.shape[0], ds.shape[1]
        if rows is None:
            want = np.arange(n)
        else:
            want = np.asarray(rows)
            if want.dtype == bool:
                if want.shape != (n,):
                    raise VislensError(f"{self.path}: rows mask has shape {want.shape}, "
                                       f"expected ({n},)")
                want = np.flatnonzero(want)
            want = want.astype(np.int64).ravel()
            bad = want[(want < -n) | (want >= n)]
            if bad.size:
                raise VislensError(f"{self.path}: row {int(bad[0])} is out of range for {n} rows")
            want = want % n if n else want
        lsel, lorder = _layer_selection(layers, L, self.path)
        uniq, inv = np.unique(want, return_inverse=True)
        nl = L if lsel is None else len(lsel)
        result = out
        shape = (want.size,) + _row_shape(ds.shape, lsel, lorder)
        if out is not None and (out.shape != shape or out.dtype != np.float32
                                or not out.flags.c_contiguous):
            raise VislensError(f"{self.path}: out must be a C-contiguous float32 array of shape "
                               f"{shape}, got {out.dtype} {out.shape}")
        inv = inv.ravel()
        in_order = inv.size == uniq.size and lorder is None and (inv == np.arange(inv.size)).all()
        out = result if result is not None and in_order else \
            np.empty((uniq.size, nl) + ds.shape[2:], dtype=np.float32)
        if uniq.size >= 4 and _is_final_attention(ds):
            _read_final_rows(ds, uniq, lsel, out)
        else:
            for start, stop, off in _runs(uniq):
                for a in range(start, stop, 64):
                    b = min(stop, a + 64)
                    block = _values(ds, np.s_[a:b] if lsel is None else np.s_[a:b, lsel])
                    dst = out[off + a - start:off + b - start]
                    if block.dtype == np.float16:  # the table is faster than numpy's cast
                        _half_into(block.view(np.uint16), dst)
                    else:
                        dst[...] = block
        missing = ~_values(g["done"]).astype(bool)[uniq]
        if missing.any():
            out[missing] = np.nan
        if in_order:
            return out  # rows were already sorted and unique: no reordering copy
        if lorder is not None:
            out = out[:, lorder]
        if result is None:
            return out[inv]
        np.take(out, inv, axis=0, out=result)
        return result

    def iter_attention(self, condition: str, chunk: int = 256,
                       layers: int | Sequence[int] | slice | None = None, *,
                       prefetch: bool = False, reuse: bool = False
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(rows, attn[n, L', H, G, G] float32)`` over the done rows, ``chunk`` at a time.

        ``prefetch`` reads and decodes the next chunk on a background thread while the
        caller works on the current one. ``reuse`` decodes into the same one or two buffers
        (two with ``prefetch``) instead of fresh memory per chunk, so a yielded array is
        only valid until the next step: copy what you keep. Either way at most two chunks
        are in memory.
        """
        if chunk < 1:
            raise VislensError(f"{self.path}: iter_attention chunk={chunk} must be >= 1")
        rows = np.flatnonzero(self.done(condition))
        parts = [rows[i:i + chunk] for i in range(0, rows.size, chunk)]
        if not parts:
            return
        buffers: list[np.ndarray] = []
        if reuse:
            shape = self._group(condition)["image_attention"].shape
            per_row = _row_shape(shape, *_layer_selection(layers, shape[1], self.path))
            buffers = [np.empty((len(parts[0]),) + per_row, np.float32)
                       for _ in range(2 if prefetch and len(parts) > 1 else 1)]

        def read(k: int) -> np.ndarray:
            buf = buffers[k % len(buffers)][:len(parts[k])] if buffers else None
            return self.attention(condition, parts[k], layers, out=buf)

        if not prefetch or len(parts) < 2:
            for k, part in enumerate(parts):
                yield part, read(k)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(read, 0)
            for k, part in enumerate(parts):
                attn = ahead.result()
                if k + 1 < len(parts):
                    ahead = pool.submit(read, k + 1)
                yield part, attn
                del attn

    def masses(self, condition: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image_mass, text_mass)``, each ``[N, L, H]`` float32; NaN where not done."""
        g = self._group(condition)
        done = _values(g["done"]).astype(bool)
        img = _values(g["image_attention_mass"]).astype(np.float32)
        txt = _values(g["text_attention_mass"]).astype(np.float32)
        img[~done] = np.nan
        txt[~done] = np.nan
        return img, txt

    def box_mask(self) -> np.ndarray | None:
        """``[N, G, G]`` float32 object coverage of each grid cell, or None if not stored."""
        if "boxes/mask" not in self._f:
            return None
        return _values(self._f["boxes/mask"]).astype(np.float32)

    def boxes(self) -> pd.DataFrame | None:
        """One row per box: row, id, label, x0, y0, x1, y1, score (pixels); None if absent."""
        if "boxes" not in self._f:
            return None
        b = self._f["boxes"]
        rows = _values(b["sample"]).astype(np.int64)
        xyxy = _values(b["xyxy"]).astype(np.float32).reshape(-1, 4)
        ids = _text(self._f["samples/id"])
        return pd.DataFrame({
            "row": rows, "id": ids[rows] if rows.size else np.array([], dtype=object),
            "label": _text(b["label"]), "x0": xyxy[:, 0], "y0": xyxy[:, 1],
            "x1": xyxy[:, 2], "y1": xyxy[:, 3], "score": _values(b["score"]).astype(np.float32),
        })

    def unmatched(self) -> pd.DataFrame | None:
        """Question objects the detector found no box for: row, id, label, reason."""
        if "boxes/unmatched_sample" not in self._f:
            return None
        b = self._f["boxes"]
        rows = _values(b["unmatched_sample"]).astype(np.int64)
        ids = _text(self._f["samples/id"])
        return pd.DataFrame({"row": rows, "id": ids[rows] if rows.size else np.array([], dtype=object),
                             "label": _text(b["unmatched_label"]),
                             "reason": _text(b["unmatched_reason"])})

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "working"
        return (f"Capture({str(self.path)!r}, {self._n} samples, conditions="
                f"{self.conditions}, {state})")


# float16 bit pattern -> float32 value; a gather from this 256 KiB table is several times
# faster than numpy's float16 -> float32 cast, which dominates reading otherwise
_HALF_TO_SINGLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _half_into(codes: np.ndarray, out: np.ndarray) -> None:
    """float16 bit patterns (uint16) -> float32 values in ``out``, through the table."""
    np.take(_HALF_TO_SINGLE, codes, out=out)


def _decode_final_chunk(data: bytes, shape: tuple[int, ...], lsel: list[int] | None,
                        out: np.ndarray, k: int) -> bool:
    """Inflate + unshuffle one final-file chunk into ``out[k]`` (runs on a worker thread);
    False when the chunk is not what a final file stores (HDF5 then decodes it, or says
    why it cannot)."""
    try:
        raw = np.frombuffer(_inflate(data), dtype=np.uint8)
    except Exception:  # zlib.error, isal's IsalError: corrupted bytes
        return False
    half = int(np.prod(shape))
    if raw.size != 2 * half:
        return False
    bits = np.empty(2 * half, dtype=np.uint8)  # undo HDF5's byte shuffle (little-endian)
    bits[0::2] = raw[:half]
    bits[1::2] = raw[half:]
    codes = bits.view(np.uint16).reshape(shape)
    if lsel is not None:
        codes = codes[lsel]
    _half_into(codes, out[k])
    return True


def _read_final_rows(ds: h5py.Dataset, rows: np.ndarray, lsel: list[int] | None,
                     out: np.ndarray) -> None:
    """Read final-file attention rows with decompression spread over threads.

    HDF5 inflates chunks on one thread; reading the stored chunks and inflating them here
    (zlib and numpy release the GIL) makes streaming analysis several times faster.
    """
    shape = ds.shape[1:]
    zero = (0,) * len(shape)
    workers = max(1, min(8, os.cpu_count() or 1))
    inflight: deque[tuple[int, int, Any]] = deque()

    def settle() -> None:
        k, r, fut = inflight.popleft()
        if not fut.result():  # unexpected or undecodable chunk: let HDF5 decode it (or say why not)
            out[k] = _values(ds, np.s_[r] if lsel is None else np.s_[r, lsel])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k, r in enumerate(rows.tolist()):
            try:
                mask, data = ds.id.read_direct_chunk((r,) + zero)
            except IO_ERRORS as exc:
                raise _corrupt(ds, exc, (r, r)) from None
            if mask != 0:  # a filter was skipped for this chunk: let HDF5 decode it
                out[k] = _values(ds, np.s_[r] if lsel is None else np.s_[r, lsel])
                continue
            inflight.append((k, r, pool.submit(_decode_final_chunk, data, shape, lsel, out, k)))
            if len(inflight) > 4 * workers:
                settle()
        while inflight:
            settle()


def _trim(options: list[str]) -> list[str]:
    while options and options[-1] == "":
        options.pop()
    return options


def _row_shape(shape: tuple[int, ...], lsel: list[int] | None, lorder: np.ndarray | None
               ) -> tuple[int, ...]:
    """``[L', H, G, G]`` of one row of attention ``shape`` under a layer selection."""
    n_layers = shape[1] if lsel is None else len(lsel) if lorder is None else len(lorder)
    return (n_layers,) + tuple(shape[2:])


def _layer_selection(layers: int | Sequence[int] | slice | None, L: int, path: Path
                     ) -> tuple[list[int] | None, np.ndarray | None]:
    """Sorted unique layers to read, and how to reorder them into the requested order."""
    if layers is None:
        return None, None
    if isinstance(layers, slice):
        wanted = list(range(L))[layers]
    elif isinstance(layers, (int, np.integer)):
        wanted = [int(layers)]
    else:
        wanted = [int(x) for x in np.asarray(layers).ravel()]
    wanted = [x + L if x < 0 else x for x in wanted]
    bad = [x for x in wanted if not 0 <= x < L]
    if bad or not wanted:
        raise VislensError(f"{path}: layers {layers!r} out of range for {L} layers")
    uniq = sorted(set(wanted))
    order = np.searchsorted(uniq, wanted)
    return uniq, (None if uniq == wanted else order)
