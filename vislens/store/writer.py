"""Writing a capture: the job spec, the crash-safe working file and its commit protocol,
resume checks, and finalize."""
from __future__ import annotations

import errno
import hashlib
import os
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from ..errors import VislensError
from ..io import IO_ERRORS, check_free_space, human_bytes, is_disk_full, os_reason, real_path
from . import compact
from .format import (ClosingContext, FINGERPRINT_CHARS, FORMAT, FORMAT_VERSION, LOGIT_FIELDS,
                     PREDICTION_BYTES, REASON_BYTES, RESUME_IGNORED_ATTRS, SAMPLE_TEXT_FIELDS,
                     SPEC_FIELDS, STORE_OWNED, TIME_FIELD, alloc_dataset, check_format,
                     done_matrix, failed_flags, format_version, fixed_strings, free_bytes, fsync_dir, fsync_path, stored_form, open_h5,
                     plain_value, read_attrs, set_attrs, short_repr, read_text, tmp_of, to_f16,
                     trim_options, unlink_quietly, utf8_bytes, write_boxes, write_rows)
from .lock import OutputLock

if TYPE_CHECKING:  # decoding imports torch; the store must not
    from ..data.base import Box, Sample
    from ..conditions import Condition, ConditionResult


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
        free = free_bytes(path)
        raise VislensError(f"{shown}: cannot reserve {human_bytes(size)} for the working file "
                           f"({os_reason(exc)}; {human_bytes(free)} free in {path.parent})"
                           ) from None
    finally:
        os.close(fd)


@dataclass
class CaptureJob:
    """What one capture job writes: validated and laid out by :meth:`CaptureWriter.open`.

    ``attrs`` must hold ``model``; ``model_revision``, ``dataset`` and ``command`` default
    to ``""``, ``""`` and this process's command line. ``sample_index`` is each sample's
    position in the full dataset (default 0..N-1; merge orders by it); ``sizes`` the
    original image sizes; ``box_masks`` ``[N, G, G]`` object coverage and ``boxes`` the
    boxes per sample, from ``box_source``; ``views`` ``[N, 4]`` the normalised rectangle of
    each image the model sees (``samples/view``; optional).
    """

    samples: Sequence["Sample"]
    conditions: Sequence["Condition"]
    grid: int
    num_layers: int
    num_heads: int
    num_options: int
    attrs: Mapping[str, Any]
    sample_index: Sequence[int] | None = None
    sizes: Sequence[tuple[int, int] | None] | None = None
    box_masks: np.ndarray | None = None
    boxes: Sequence[Sequence["Box"]] | None = None
    box_source: str = "annotations"
    views: np.ndarray | None = None


class CaptureWriter(ClosingContext):
    """Exclusive, crash-safe writer of one capture file (create or resume).

    Use :meth:`open`; write committed batches with :meth:`write_batch`, skipped samples
    with :meth:`write_failure`, then :meth:`finalize` and :meth:`close` (or use it as a
    context manager, which closes but does not finalize).
    """

    def __init__(self, path: Path, lock: OutputLock, *, durable: bool) -> None:
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
    def open(cls, path: str | Path, job: CaptureJob | None = None, *, durable: bool = False,
             lock: OutputLock | None = None, **fields: Any) -> "CaptureWriter":
        """Create ``path``, or resume it if it exists and matches ``job``.

        ``job`` is a :class:`CaptureJob`; its fields may instead be given as keywords
        (``samples=..., conditions=..., grid=...``, as before the job object existed).
        Takes ``path.lock`` for the writer's lifetime (or adopts ``lock``, from
        :func:`lock_output`, taken earlier) and removes a leftover ``path.tmp``. A
        symlinked ``path`` is resolved: the lock, the writes and the final replace act on
        the real file, and the link stays a link. ``durable`` fsyncs each batch's rows
        before its done flags, the cleared flags of rewritten rows before their rewrite and
        a failure's reason before its ``failed`` flag (survives power loss, not only
        ``kill -9``). Resuming checks
        the job's spec and every sample's content fingerprint (question, options, answer,
        image bytes) against the file's.
        """
        path = Path(path)
        try:
            if job is None:
                job = CaptureJob(**fields)
            elif fields:
                raise TypeError(f"CaptureWriter.open: give a job or its fields, not both "
                                f"({', '.join(fields)})")
            spec = _JobSpec.build(path, job)
            if lock is None:
                lock = OutputLock(path)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        real = real_path(path)
        try:
            tmp = tmp_of(real)
            if tmp.exists():
                tmp.unlink()
            if real.exists():
                with open_h5(real) as f:
                    check_format(f, path)
                    version = format_version(f)
                    if version != FORMAT_VERSION and not plain_value(f.attrs.get("complete")):
                        raise VislensError(
                            f"{path}: cannot resume: the working file has capture format "
                            f"version {version}, this vislens writes version {FORMAT_VERSION}; "
                            "finish it with the vislens that started it, or write a new file")
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
        with open_h5(self._real) as f:
            complete = bool(plain_value(f.attrs.get("complete", False)))
        self._final = complete
        self._f = open_h5(self._real, "r") if complete else open_h5(self._real, "r+",
                                                                       rdcc_nbytes=0)
        f = self._f
        self._conds = list(f["conditions"])
        self._n = f["samples/id"].shape[0]
        self._grid = int(plain_value(f.attrs["grid"])[0])
        self._L = int(plain_value(f.attrs["num_layers"]))
        self._H = int(plain_value(f.attrs["num_heads"]))
        self._K = int(plain_value(f.attrs["num_options"]))
        self._done = done_matrix(f)
        self._fail = failed_flags(f)
        self._ds: dict[str, h5py.Dataset] = {}
        if not complete:
            f.visititems(lambda name, obj: self._ds.__setitem__(name, obj)
                         if isinstance(obj, h5py.Dataset) else None)

    # ------------------------------------------------------------------ state

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's root attributes (plain Python values)."""
        if self._closed or self._f is None:
            raise VislensError(f"{self.path}: attrs after close()")
        return read_attrs(self._f)

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
                free = human_bytes(free_bytes(self._real))
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
            fsync_path(self._real)

    # ------------------------------------------------------------------ writing

    def write_batch(self, rows: Sequence[int], results: Sequence[Mapping[str, "ConditionResult"]],
                    correct: Sequence[Mapping[str, bool]],
                    sizes: Sequence[tuple[int, int] | None] | None = None) -> None:
        """Write and commit every condition's results for ``rows`` (one dict per row).

        Rows already done or failed are first un-committed (done and failed flags cleared
        and flushed), so a kill while overwriting them can never leave a done flag over
        partial data, nor a row both done and failed. A failed write (a full disk) raises a
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
            # un-commit rows being rewritten (or previously failed): done and failed flags
            # are cleared before any data or done flag is written, so a row is never both
            redo = self._done[:, rows].any(axis=0) | self._fail[rows]
            if redo.any():
                again = rows[redo]
                for ci, c in enumerate(self._conds):
                    write_rows(ds[f"conditions/{c}/done"], again, np.zeros(again.size, dtype=bool))
                    self._done[ci, again] = False
                if self._fail[again].any():
                    was_failed = again[self._fail[again]]
                    write_rows(ds["errors/failed"], was_failed,
                               np.zeros(was_failed.size, dtype=bool))
                    self._fail[was_failed] = False
                self._commit_flush()  # (durable: fsynced) before the rows are overwritten
            for c, arrays in data.items():
                for field, values in arrays.items():
                    write_rows(ds[f"conditions/{c}/{field}"], rows, values)
            first = [d[self._conds[0]] for d in res] if self._conds else []
            for name in ("n_image_tokens", "n_text_tokens"):
                write_rows(ds[f"samples/{name}"], rows,
                            np.array([getattr(it, name) for it in first], dtype=np.int32))
            if sizes is not None:
                wh = np.array([(0, 0) if s is None else tuple(s) for s in sizes],
                              dtype=np.int64)[order]
                write_rows(ds["samples/width"], rows, wh[:, 0].astype(np.int32))
                write_rows(ds["samples/height"], rows, wh[:, 1].astype(np.int32))
            self._commit_flush()  # rows are on disk before any done flag says so

            B = rows.size
            for ci, c in enumerate(self._conds):
                write_rows(ds[f"conditions/{c}/done"], rows, np.ones(B, dtype=bool))
            self._f.flush()
        self._done[:, rows] = True

    def _condition_arrays(self, c: str, rows: np.ndarray, res: Sequence[Mapping[str, Any]],
                          cor: Sequence[Mapping[str, bool]]) -> dict[str, np.ndarray]:
        """The rows of condition ``c``'s datasets for one batch, validated, ready to write."""
        B, shape = rows.size, (self._L, self._H, self._grid, self._grid)
        items = [d[c] for d in res]
        attn = np.empty((B,) + shape, dtype=np.float16)
        img = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
        txt = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
        lmean = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
        lmax = np.full((B, self._L, self._H), np.nan, dtype=np.float32)
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
                attn[i] = a if a.dtype == np.float16 else to_f16(a)
            for arr, value, name in ((img, item.image_mass, "image_mass"),
                                     (txt, item.text_mass, "text_mass"),
                                     (lmean, getattr(item, LOGIT_FIELDS[0], None), LOGIT_FIELDS[0]),
                                     (lmax, getattr(item, LOGIT_FIELDS[1], None), LOGIT_FIELDS[1])):
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
            "prediction": fixed_strings([it.text for it in items], width, PREDICTION_BYTES),
            "correct": np.array([bool(x[c]) for x in cor], dtype=bool),
            "confidence": np.array([it.confidence for it in items], dtype=np.float32),
            "alpha_used": np.array([it.alpha_used for it in items], dtype=np.float32),
            LOGIT_FIELDS[0]: lmean, LOGIT_FIELDS[1]: lmax,
            TIME_FIELD: np.array([getattr(it, TIME_FIELD, np.nan) for it in items],
                                 dtype=np.float32),
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
            ds["errors/reason"][r:r + 1] = fixed_strings([" ".join(str(reason).split())], width,
                                                  REASON_BYTES)
            self._commit_flush()  # cleared done flags and the reason before ``failed``
            ds["errors/failed"][r] = True
            self._f.flush()
        self._fail[r] = True

    # ------------------------------------------------------------------ finishing

    def finalize(self, attrs: Mapping[str, Any] | None = None) -> Path:
        """Compact the file once every sample is done or failed; else leave it as is.

        Writes ``FILE.tmp`` (compressed, variable-length strings, ``complete=True``) and
        atomically replaces ``FILE`` (the real file: a symlink stays a link); on any error
        the working file is left intact and the writer stays usable. ``attrs`` are root
        attributes known only at the end (the hosts of a Ray job); they cannot be part of
        the job's spec (only :data:`RESUME_IGNORED_ATTRS` may be given).
        """
        bad = sorted(set(attrs or {}) - RESUME_IGNORED_ATTRS)
        if bad:
            raise VislensError(f"{self.path}: finalize: attr {bad[0]!r} is part of the job's "
                               "spec and cannot change")
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
        tmp = tmp_of(self._real)
        try:
            with open_h5(self._real) as src:
                final_attrs = {**read_attrs(src), **(attrs or {}), "complete": True}
                n = src["samples/id"].shape[0]
                compact.build_final(tmp, [src], np.zeros(n, dtype=np.int64), np.arange(n),
                                    final_attrs)
            fsync_path(tmp)
            os.replace(tmp, self._real)
            fsync_dir(self._real)
        except BaseException as exc:
            unlink_quietly(tmp)
            self._load()
            if isinstance(exc, IO_ERRORS):
                hint = "run the same command again (or finalize() again) to finish"
                if is_disk_full(exc):
                    hint = (f"{human_bytes(free_bytes(self._real))} free in "
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

    def __repr__(self) -> str:
        state = "complete" if self._final else f"{self.pending_indices().size} pending"
        return f"CaptureWriter({str(self.path)!r}, {self._n} samples, {state})"


class _JobSpec:
    """What a job will write: validated inputs, the working-file layout and resume checks."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    @classmethod
    def build(cls, path: Path, job: CaptureJob) -> "_JobSpec":
        samples, conditions, attrs = job.samples, job.conditions, job.attrs
        grid, L, H, K = job.grid, job.num_layers, job.num_heads, job.num_options
        sample_index, sizes = job.sample_index, job.sizes
        box_masks, boxes = job.box_masks, job.boxes
        box_source = job.box_source
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
        s.views = None
        if job.views is not None:
            v = np.asarray(job.views, dtype=np.float32)
            if v.shape != (n, 4) or not np.isfinite(v).all() or (v < 0).any() or (v > 1).any():
                raise VislensError(f"{path}: views must be [{n}, 4] rectangles in [0, 1], got "
                                   f"shape {v.shape}")
            s.views = v

        owned = {"format": FORMAT, "format_version": FORMAT_VERSION, "grid": [s.grid, s.grid],
                 "num_layers": s.L, "num_heads": s.H, "num_options": s.K, "complete": False}
        for key in STORE_OWNED:
            if key in attrs and attrs[key] is not None and stored_form(attrs[key]) != stored_form(owned[key]) \
                    and not (key == "grid" and stored_form(attrs[key]) == s.grid):
                raise VislensError(f"{path}: attrs[{key!r}]={short_repr(attrs[key])} conflicts with "
                                   f"the store's value {short_repr(owned[key])}")
        if not attrs.get("model"):
            raise VislensError(f"{path}: attrs must name the model (attrs['model'])")
        from .. import __version__

        root: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": "",
            "model_revision": "", "vislens_version": __version__, "grid": [s.grid, s.grid],
            "num_layers": s.L, "num_heads": s.H, "num_options": s.K,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(sys.argv), "dataset": "", "complete": False,
        }
        for key, value in attrs.items():
            if key not in STORE_OWNED and not (value is None and key in root):
                root[key] = value
        s.attrs = root
        return s

    # ------------------------------------------------------------------ resume

    def check_resume(self, f: h5py.File, path: Path) -> None:
        """Raise a one-line VislensError at the first field where ``f`` differs from this job."""

        def differ(field: str, have: Any, want: Any) -> None:
            raise VislensError(f"{path}: cannot resume: {field} is {short_repr(have)} in the file "
                               f"but {short_repr(want)} in this job")

        fa = read_attrs(f)
        for key in SPEC_FIELDS:
            if fa.get(key) != stored_form(self.attrs[key]):
                differ(key, fa.get(key), stored_form(self.attrs[key]))
        n = f["samples/id"].shape[0]
        if n != self.n:
            differ("number of samples", n, self.n)
        ids = read_text(f["samples/id"])
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
            stored = read_attrs(f[f"conditions/{name}"])
            for key in sorted(set(stored) | set(cattrs)):
                if stored.get(key) != stored_form(cattrs.get(key)):
                    differ(f"conditions/{name} attr {key}", stored.get(key), stored_form(cattrs.get(key)))
        keys = (set(fa) | set(self.attrs)) - set(SPEC_FIELDS) - set(STORE_OWNED) \
            - RESUME_IGNORED_ATTRS
        for key in sorted(keys):
            if fa.get(key) != stored_form(self.attrs.get(key)):
                differ(f"attr {key}", fa.get(key), stored_form(self.attrs.get(key)))

    def _check_content(self, f: h5py.File, path: Path, ids: np.ndarray, differ: Any) -> None:
        """Samples must hold what they held when the file was made (same ids, edited JSONL
        or replaced images are refused): question, answer, options compared as stored, the
        image through the content fingerprint. A file without ``/samples/fingerprint``
        (vislens < 0.2) is checked on the stored text only."""
        for name in ("question", "answer"):
            stored = read_text(f[f"samples/{name}"])
            for i, smp in enumerate(self.samples):
                if stored[i] != str(getattr(smp, name)):
                    differ(f"samples/{name}[{i}] (sample {ids[i]!r})", stored[i],
                           str(getattr(smp, name)))
        stored_opts = read_text(f["samples/options"])
        for i, smp in enumerate(self.samples):
            have, want = trim_options(list(stored_opts[i])), [str(o) for o in smp.options]
            if have != want:
                differ(f"samples/options[{i}] (sample {ids[i]!r})", have, want)
        if "samples/fingerprint" not in f:
            return
        stored = read_text(f["samples/fingerprint"])
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
        widths = {name: max(1, max(len(utf8_bytes(v)) for v in vals)) for name, vals in text.items()}
        widths["options"] = max(1, max(len(utf8_bytes(o)) for row in opts for o in row))
        check_free_space(shown, working_file_bytes(self.samples, len(self.conditions), self.grid,
                                                   self.L, self.H, self.K), "the working file")
        tmp = tmp_of(path)
        try:
            with h5py.File(tmp, "w") as f:
                set_attrs(f, self.attrs)
                gs = f.create_group("samples")
                for name, vals in text.items():
                    alloc_dataset(gs, name, h5py.string_dtype("utf-8", widths[name]), (n,))[...] = \
                        fixed_strings(vals, widths[name])
                ds = alloc_dataset(gs, "options", h5py.string_dtype("utf-8", widths["options"]), (n, K))
                ds[...] = fixed_strings([o for row in opts for o in row], widths["options"]).reshape(n, K)
                alloc_dataset(gs, "index", np.int64, (n,))[...] = self.index
                alloc_dataset(gs, "width", np.int32, (n,))[...] = self.sizes[:, 0]
                alloc_dataset(gs, "height", np.int32, (n,))[...] = self.sizes[:, 1]
                if self.views is not None:
                    alloc_dataset(gs, "view", np.float32, (n, 4))[...] = self.views
                for name in ("n_image_tokens", "n_text_tokens"):
                    alloc_dataset(gs, name, np.int32, (n,))[...] = np.zeros(n, dtype=np.int32)
                alloc_dataset(gs, "fingerprint", h5py.string_dtype("utf-8", FINGERPRINT_CHARS), (n,))[...] = \
                    fixed_strings(self.fingerprints, FINGERPRINT_CHARS)

                ge = f.create_group("errors")
                alloc_dataset(ge, "failed", bool, (n,))[...] = np.zeros(n, dtype=bool)
                alloc_dataset(ge, "reason", h5py.string_dtype("utf-8", REASON_BYTES), (n,))[...] = \
                    fixed_strings([""] * n, REASON_BYTES)

                gc = f.create_group("conditions", track_order=True)
                G, L, H = self.grid, self.L, self.H
                for name, cattrs in self.conditions:
                    g = gc.create_group(name)
                    set_attrs(g, cattrs)
                    alloc_dataset(g, "image_attention", np.float16, (n, L, H, G, G), (1, L, H, G, G))
                    alloc_dataset(g, "image_attention_mass", np.float32, (n, L, H))
                    alloc_dataset(g, "text_attention_mass", np.float32, (n, L, H))
                    alloc_dataset(g, "prediction", h5py.string_dtype("utf-8", PREDICTION_BYTES), (n,))
                    alloc_dataset(g, "correct", bool, (n,))
                    alloc_dataset(g, "confidence", np.float32, (n,))
                    alloc_dataset(g, "alpha_used", np.float32, (n,))
                    for field in LOGIT_FIELDS:
                        alloc_dataset(g, field, np.float32, (n, L, H))
                    alloc_dataset(g, TIME_FIELD, np.float32, (n,))
                    alloc_dataset(g, "option_probs", np.float32, (n, K))
                    alloc_dataset(g, "done", bool, (n,))[...] = np.zeros(n, dtype=bool)

                if self.box_masks is not None or self.boxes is not None:
                    write_boxes(f, self.box_masks, self.boxes, self.box_source, fixed=True)
            _reserve(tmp, shown)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_dir(path)
        except IO_ERRORS as exc:
            unlink_quietly(tmp)
            raise VislensError(f"{shown}: cannot create the working file ({os_reason(exc)}; "
                               f"{human_bytes(free_bytes(path))} free in {path.parent})"
                               ) from None
        except BaseException:
            unlink_quietly(tmp)
            raise


def working_file_bytes(samples: Sequence["Sample"], n_conditions: int, grid: int,
                       num_layers: int, num_heads: int, num_options: int) -> int:
    """Upper bound of a working file's size (the disk space a capture job reserves)."""
    n, L, H, G, K = len(samples), num_layers, num_heads, grid, num_options
    widths = sum(max([1] + [len(utf8_bytes(getattr(smp, name))) for smp in samples])
                 for name in SAMPLE_TEXT_FIELDS)
    widths += max([1] + [len(utf8_bytes(o)) for smp in samples for o in smp.options]) * K
    per_cond = n * (L * H * (G * G * 2 + 16) + K * 4 + PREDICTION_BYTES + 14)
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
