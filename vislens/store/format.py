"""The capture format: its constants, and how values are encoded in and decoded from
HDF5 (attrs, fixed- and variable-length strings, float16, preallocated datasets, the
``/boxes`` layout), plus the small file helpers every part of the store shares.

Specified in ``docs/capture-format.md``; nothing here knows about jobs, merging or locks.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Self, Sequence

import h5py
import numpy as np

from ..errors import VislensError
from ..io import IO_ERRORS

if TYPE_CHECKING:  # decoding imports torch; the store must not
    from ..data.base import Box

class ClosingContext:
    """``with obj:`` closes ``obj`` on exit (writers and readers of capture files)."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


FORMAT = "vislens-capture"
FORMAT_VERSION = 2
#: versions readers accept (version 1: no image logits, no compute time)
READABLE_VERSIONS = (1, 2)
#: ``[N, L, H]`` float32 per condition since version 2: mean / max of the answer row's
#: image-key logits after the intervention, before mask and softmax (Figure 26)
LOGIT_FIELDS = ("image_logit_mean", "image_logit_max")
#: ``[N]`` float32 per condition since version 2: engine seconds per sample (Table 9)
TIME_FIELD = "compute_seconds"
#: predictions are stored truncated to this many utf-8 bytes (cut at a character boundary)
PREDICTION_BYTES = 256
#: failure reasons are stored truncated to this many utf-8 bytes
REASON_BYTES = 512
#: root attrs that may differ between a job and the file it resumes (or between shards)
RESUME_IGNORED_ATTRS = frozenset({
    "command", "created_utc", "vislens_version", "complete", "batch_size", "device",
    "num_workers", "hostname", "pid", "resumed", "workers", "ray_version", "hosts",
})
#: hex characters of a sample's content fingerprint (sha256)
FINGERPRINT_CHARS = 64
#: gzip level of the final file
GZIP_LEVEL = 1  # attention maps compress ~1.2x at any level; 1 is the fastest

SAMPLE_TEXT_FIELDS = ("id", "question", "answer", "relation", "image_path", "group", "split")
STORE_OWNED = ("format", "format_version", "grid", "num_layers", "num_heads", "num_options",
                "complete")
SPEC_FIELDS = ("model", "model_revision", "dataset", "grid", "num_layers", "num_heads",
                "num_options")


def utf8_bytes(text: Any, limit: int | None = None) -> bytes:
    """utf-8 bytes of ``text``, cut to ``limit`` bytes at a character boundary."""
    b = str(text).encode("utf-8", "replace")
    if limit is not None and len(b) > limit:
        b = b[:limit].decode("utf-8", "ignore").encode("utf-8")
    return b


def fixed_strings(values: Sequence[Any], width: int, limit: int | None = None) -> np.ndarray:
    """Fixed-length utf-8 string array (h5py dtype) of byte width ``width``."""
    return np.array([utf8_bytes(v, limit) for v in values], dtype=h5py.string_dtype("utf-8", width))


def read_text(ds: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """Read a fixed- or variable-length utf-8 string dataset as an object array of str."""
    try:
        return np.asarray(ds.asstr()[sel], dtype=object)
    except IO_ERRORS as exc:
        raise corrupt_error(ds, exc) from None


def read_values(ds: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """``ds[sel]``; a chunk that cannot be read (corrupted bytes) is one line naming the
    file, the condition and the rows."""
    try:
        return ds[sel]
    except IO_ERRORS as exc:
        raise corrupt_error(ds, exc) from None


def corrupt_error(ds: h5py.Dataset, exc: BaseException,
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


def attr_value(value: Any) -> Any:
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
        return json.dumps([plain_value(v) for v in items], default=str)
    return str(value)


def plain_value(value: Any) -> Any:
    """Stored attr value -> plain Python (str, bool, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def stored_form(value: Any) -> Any:
    """Comparable form of an attr value as it would read back from the file."""
    return plain_value(attr_value(value))


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        stored = attr_value(value)
        if stored is not None:
            obj.attrs[key] = stored


def read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: plain_value(v) for k, v in obj.attrs.items()}


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def row_runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Runs of consecutive values in sorted ``rows``: (first row, stop row, offset in rows)."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [rows.size]))
    for a, b in zip(starts, stops):
        yield int(rows[a]), int(rows[b - 1]) + 1, int(a)


def write_rows(ds: h5py.Dataset, rows: np.ndarray, data: np.ndarray) -> None:
    """``ds[rows] = data`` for sorted unique rows, one slice write per consecutive run."""
    for start, stop, off in row_runs(rows):
        ds[start:stop] = data[off:off + stop - start]


_F16_BIAS = np.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)
_F16_DENORM_MAGIC = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
_F16_DENORM_MAGIC_F = _F16_DENORM_MAGIC.reshape(1).view(np.float32)[0]


def to_f16(x: np.ndarray) -> np.ndarray:
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


def alloc_dataset(group: h5py.Group, name: str, dtype: Any, shape: tuple[int, ...],
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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path.parent)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 0


def open_h5(path: Path, mode: str = "r", **kw: Any) -> h5py.File:
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


def check_format(f: h5py.File, path: Path) -> None:
    fmt = plain_value(f.attrs.get("format"))
    if fmt != FORMAT:
        raise VislensError(f"{path}: not a vislens capture file (format attr is {short_repr(fmt)}, "
                           f"expected {FORMAT!r})")
    version = plain_value(f.attrs.get("format_version"))
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise VislensError(f"{path}: capture format_version {short_repr(version)} is not supported "
                           f"(this vislens reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))})")
    try:  # every group and dataset header: a corrupted file fails here in one line
        f.visititems(lambda name, obj: None)
    except (*IO_ERRORS, KeyError) as exc:
        msg = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
        raise VislensError(f"{path}: corrupted capture file, its HDF5 structure cannot be read "
                           f"({msg})") from None


def format_version(f: h5py.File) -> int:
    """The file's ``format_version`` (checked by :func:`check_format`)."""
    return int(plain_value(f.attrs["format_version"]))


def done_matrix(f: h5py.File) -> np.ndarray:
    """[C, N] bool: done flags of every condition, in the file's condition order."""
    conds = list(f["conditions"])
    n = f["samples/id"].shape[0]
    if not conds:
        return np.zeros((0, n), dtype=bool)
    return np.stack([read_values(f[f"conditions/{c}/done"]).astype(bool) for c in conds])


def failed_flags(f: h5py.File) -> np.ndarray:
    if "errors/failed" in f:
        return read_values(f["errors/failed"]).astype(bool)
    return np.zeros(f["samples/id"].shape[0], dtype=bool)


def trim_options(options: list[str]) -> list[str]:
    while options and options[-1] == "":
        options.pop()
    return options


#: ``samples/view`` of a file without it (older captures): the model saw the whole image
WHOLE_VIEW = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)


def write_boxes(f: h5py.File, masks: np.ndarray | None, boxes: Sequence[Sequence["Box"]] | None,
                 source: str, *, fixed: bool) -> None:
    """Write ``/boxes`` (at creation: preallocated, fixed-length labels)."""
    gb = f.create_group("boxes")
    gb.attrs["source"] = source
    if masks is not None:
        alloc_dataset(gb, "mask", np.float32, masks.shape)[...] = masks
    rows, labels, xyxy, score = [], [], [], []
    for i, bs in enumerate(boxes or []):
        for b in bs:
            rows.append(i)
            labels.append(str(b.label))
            xyxy.append(tuple(float(v) for v in b.xyxy))
            score.append(float(getattr(b, "score", 1.0)))
    m = len(rows)
    width = max([1] + [len(utf8_bytes(x)) for x in labels])
    alloc_dataset(gb, "sample", np.int64, (m,))[...] = np.asarray(rows, dtype=np.int64)
    ds = alloc_dataset(gb, "label", h5py.string_dtype("utf-8", width), (m,))
    if m:
        ds[...] = fixed_strings(labels, width)
    alloc_dataset(gb, "xyxy", np.float32, (m, 4))[...] = np.asarray(xyxy, dtype=np.float32).reshape(m, 4)
    alloc_dataset(gb, "score", np.float32, (m,))[...] = np.asarray(score, dtype=np.float32)
