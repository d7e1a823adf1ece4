"""The final (compact) layout: rewrite rows of one or more capture files into one
compressed, ``complete`` file (finalize, merge and box editing all end here)."""
from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from ..errors import VislensError
from ..io import IO_ERRORS, human_bytes, is_disk_full, os_reason
from .format import (GZIP_LEVEL, LOGIT_FIELDS, SAMPLE_TEXT_FIELDS, TIME_FIELD, WHOLE_VIEW,
                     corrupt_error, free_bytes, plain_value, read_text, read_values, row_runs,
                     set_attrs)



_BLOCK = 32  # attention rows handled per step when compacting


def _shuffle_deflate(arr: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters would store it (releases the GIL)."""
    raw = np.ascontiguousarray(arr)
    size = raw.dtype.itemsize
    shuffled = raw.view(np.uint8).reshape(-1, size).T.tobytes() if size > 1 else raw.tobytes()
    return zlib.compress(shuffled, level)


class _BadChunk(Exception):
    """A stored chunk that does not inflate to one row (see :func:`_verified`)."""


def _verified(data: bytes, nbytes: int) -> bytes:
    """``data`` (a shuffle + deflate chunk) after checking it inflates to ``nbytes`` bytes.

    Deflate's zlib stream ends in an Adler-32 checksum of the uncompressed bytes, so
    damaged bytes fail here (releases the GIL) instead of at a later read of the copy."""
    try:
        size = len(zlib.decompress(data))
    except zlib.error as exc:
        raise _BadChunk(str(exc)) from None
    if size != nbytes:
        raise _BadChunk(f"inflates to {size} bytes, not {nbytes}")
    return data


def is_final_attention(ds: h5py.Dataset) -> bool:
    """Whether ``ds``'s chunks are stored exactly as the final file stores them."""
    if ds.chunks != (1,) + ds.shape[1:] or ds.dtype != np.float16:
        return False
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    return filters == [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]


def _gather(sources: Sequence[h5py.File], name: str, src_of: np.ndarray,
            row_of: np.ndarray) -> np.ndarray:
    """Output rows of dataset ``name``: row ``r`` = ``sources[src_of[r]][name][row_of[r]]``.

    ``samples/view`` may be missing from some sources (older files): the whole image."""
    first = next(src[name] for src in sources if name in src)
    is_text = h5py.check_string_dtype(first.dtype) is not None
    out = np.empty((src_of.size,) + first.shape[1:], dtype=object if is_text else first.dtype)
    for s, src in enumerate(sources):
        sel = src_of == s
        if sel.any():
            if name not in src and name == "samples/view":
                out[sel] = WHOLE_VIEW
                continue
            data = read_text(src[name]) if is_text else read_values(src[name])
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


def build_final(dst: Path, sources: Sequence[h5py.File], src_of: np.ndarray,
                 row_of: np.ndarray, attrs: Mapping[str, Any], *, with_boxes: bool = True) -> None:
    """Write a final (compact, ``complete``) capture file from rows of one or more sources.

    Output row ``r`` is row ``row_of[r]`` of ``sources[src_of[r]]``. Values of rows that
    are not done in a condition are written as NaN / "" / False.
    """
    f0 = sources[0]
    conds = list(f0["conditions"])
    with h5py.File(dst, "w") as out:
        set_attrs(out, attrs)
        gs = out.create_group("samples")
        names = [*SAMPLE_TEXT_FIELDS, "options", "index", "width", "height",
                 "n_image_tokens", "n_text_tokens"]
        if all("samples/fingerprint" in src for src in sources):
            names.append("fingerprint")
        if any("samples/view" in src for src in sources):
            names.append("view")
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
            # version-2 fields exist in every source or in none (merge refuses mixed versions)
            newer = [(x, np.nan) for x in (*LOGIT_FIELDS, TIME_FIELD) if x in f0[name]]
            for field, blank in (("image_attention_mass", np.nan), ("text_attention_mass", np.nan),
                                 ("option_probs", np.nan), ("confidence", np.nan),
                                 ("alpha_used", np.nan), ("correct", False), ("prediction", ""),
                                 *newer):
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
    directly, or copy already-compressed chunks byte for byte once each is verified to
    inflate (a damaged chunk is a one-line error naming its file, condition and row)."""
    src_ds = [s[f"{name}/image_attention"] for s in sources]
    shape = (src_of.size,) + src_ds[0].shape[1:]
    per_row = shape[1:]
    out = g.create_dataset("image_attention", shape=shape, dtype=np.float16,
                           chunks=(1,) + per_row, compression="gzip",
                           compression_opts=GZIP_LEVEL, shuffle=True)
    if src_of.size == 0:
        return
    raw_ok = [is_final_attention(d) for d in src_ds]
    blank = _shuffle_deflate(np.full(per_row, np.nan, dtype=np.float16))
    nbytes = int(np.prod(per_row)) * 2  # float16
    zero_off = (0,) * len(per_row)
    workers = max(1, min(8, os.cpu_count() or 1))
    pending: deque[tuple[int, list[Any]]] = deque()

    def flush_one() -> None:
        start, items = pending.popleft()
        for k, item in enumerate(items):
            try:
                data = item if isinstance(item, bytes) else item.result()
            except _BadChunk as exc:
                r = start + k
                raise corrupt_error(src_ds[int(src_of[r])], exc,
                                    rows=(int(row_of[r]),) * 2) from None
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
                        items[r - b0] = pool.submit(_verified, data, nbytes)
                        continue
                need.setdefault(s, []).append(r)
            for s, rs in need.items():
                rs_arr = np.asarray(rs)
                src_rows = row_of[rs_arr]
                order = np.argsort(src_rows)
                for start, stop, off in row_runs(src_rows[order]):
                    block = read_values(src_ds[s], slice(start, stop))
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
    gb.attrs["source"] = plain_value(sources[0]["boxes"].attrs.get("source", "annotations"))
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
        mapped = new_row[s][read_values(b[sample_key]).astype(np.int64)]
        keep = mapped >= 0
        samples.append(mapped[keep])
        for f in fields:
            text = h5py.check_string_dtype(b[f].dtype) is not None
            cols[f].append((read_text(b[f]) if text else read_values(b[f]))[keep])
    sample = np.concatenate(samples)
    order = np.argsort(sample, kind="stable")
    return sample[order], {f: np.concatenate(v)[order] for f, v in cols.items()}


@contextmanager
def writing_file(shown: Path, what: str, real: Path) -> Iterator[None]:
    """A failed write of a whole new file (a full disk) -> one line naming it and the space."""
    try:
        yield
    except IO_ERRORS as exc:
        extra = ""
        if is_disk_full(exc):
            extra = f"; {human_bytes(free_bytes(real))} free in {real.parent}"
        raise VislensError(f"{shown}: {what} failed ({os_reason(exc)}{extra}); "
                           f"{shown} is left as it was") from None
