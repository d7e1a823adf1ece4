"""Reading captures (working or final, even while a job writes them): lazy, chunked,
with a threaded decoder for final files."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from ..errors import VislensError
from ..io import IO_ERRORS
from .compact import is_final_attention
from .format import (LOGIT_FIELDS, SAMPLE_TEXT_FIELDS, TIME_FIELD, ClosingContext,
                     check_format, format_version, corrupt_error, done_matrix,
                     failed_flags, open_h5, plain_value, read_attrs, row_runs, read_text,
                     trim_options, read_values, WHOLE_VIEW)

try:  # ISA-L inflates deflate streams ~1.6x faster than zlib; reading is decode-bound
    from isal.isal_zlib import decompress as _inflate
except ImportError:  # pragma: no cover - isal is a dependency, but has no wheel everywhere
    from zlib import decompress as _inflate


def open_capture(path: str | Path) -> "Capture":
    """Open a capture file (working or final, even while a job writes it) read-only."""
    return Capture(path)


class Capture(ClosingContext):
    """Read-only view of a capture file; attention is read lazily, slice by slice.

    Rows of a condition that are not (yet) done read as NaN (attention, masses) and are
    left out of :meth:`table` unless ``done_only=False``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_h5(self.path)
        try:
            check_format(self._f, self.path)
            self.attrs: dict[str, Any] = read_attrs(self._f)
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
        return read_attrs(self._group(name))

    def done(self, condition: str) -> np.ndarray:
        """[N] bool: rows whose results for ``condition`` are complete."""
        return read_values(self._group(condition)["done"]).astype(bool)

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
        return int(done_matrix(self._f).all(axis=0).sum()) if self.conditions else 0

    @property
    def n_failed(self) -> int:
        """Samples skipped with ``--on-error skip`` (no results)."""
        return int(failed_flags(self._f).sum())

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
            cols: dict[str, Any] = {name: read_text(f[f"samples/{name}"])
                                    for name in SAMPLE_TEXT_FIELDS}
            opts = read_text(f["samples/options"])
            cols["options"] = [trim_options(list(row)) for row in opts]
            cols["index"] = read_values(f["samples/index"]).astype(np.int64)
            self._static = pd.DataFrame(cols)
        df = self._static.copy()
        df["width"] = read_values(f["samples/width"]).astype(np.int32)
        df["height"] = read_values(f["samples/height"]).astype(np.int32)
        for name in ("n_image_tokens", "n_text_tokens"):
            ds = f.get(f"samples/{name}")
            df[name] = ds[()].astype(np.int32) if ds is not None else np.zeros(len(df), np.int32)
        df["failed"] = failed_flags(f)
        df["reason"] = read_text(f["errors/reason"]) if "errors/reason" in f else ""
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
            done = read_values(g["done"]).astype(bool)
            keep = np.flatnonzero(done) if done_only else np.arange(self._n)
            probs = read_values(g["option_probs"]).astype(np.float32)
            pred = read_text(g["prediction"])
            corr = read_values(g["correct"]).astype(bool)
            conf = read_values(g["confidence"]).astype(np.float32)
            alpha = read_values(g["alpha_used"]).astype(np.float32)
            pred[~done], corr[~done], conf[~done], alpha[~done] = "", False, np.nan, np.nan
            probs[~done] = np.nan
            method = str(plain_value(g.attrs.get("method", "")))
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
        if uniq.size >= 4 and is_final_attention(ds):
            _read_final_rows(ds, uniq, lsel, out)
        else:
            for start, stop, off in row_runs(uniq):
                for a in range(start, stop, 64):
                    b = min(stop, a + 64)
                    block = read_values(ds, np.s_[a:b] if lsel is None else np.s_[a:b, lsel])
                    dst = out[off + a - start:off + b - start]
                    if block.dtype == np.float16:  # the table is faster than numpy's cast
                        _half_into(block.view(np.uint16), dst)
                    else:
                        dst[...] = block
        missing = ~read_values(g["done"]).astype(bool)[uniq]
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
        done = read_values(g["done"]).astype(bool)
        img = read_values(g["image_attention_mass"]).astype(np.float32)
        txt = read_values(g["text_attention_mass"]).astype(np.float32)
        img[~done] = np.nan
        txt[~done] = np.nan
        return img, txt

    @property
    def format_version(self) -> int:
        """The file's capture format version (1 lacks image logits and compute time)."""
        return format_version(self._f)

    def _newer(self, condition: str, name: str, what: str) -> h5py.Dataset:
        g = self._group(condition)
        if name not in g:
            raise VislensError(f"{self.path}: needs a capture made by vislens >= 0.2 ({what}); "
                               f"this file has capture format version {self.format_version}")
        return g[name]

    def image_logits(self, condition: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, max)``, each ``[N, L, H]`` float32: the answer row's logits over the
        image keys (after the intervention, before mask and softmax); NaN where not done.
        A version-1 file has none: one-line VislensError saying so."""
        done = self.done(condition)
        out = []
        for name in LOGIT_FIELDS:
            v = read_values(self._newer(condition, name, "image logits")).astype(np.float32)
            v[~done] = np.nan
            out.append(v)
        return out[0], out[1]

    def compute_seconds(self, condition: str) -> np.ndarray:
        """``[N]`` float32 engine seconds per sample the condition needed (Table 9; see
        ``docs/capture-format.md``); NaN where not done. Version 1: one-line VislensError."""
        v = read_values(self._newer(condition, TIME_FIELD, "compute time")).astype(np.float32)
        v[~self.done(condition)] = np.nan
        return v

    def views(self) -> np.ndarray:
        """``[N, 4]`` float32: the normalised rectangle ``(x0, y0, x1, y1)`` of each sample's
        image the model saw (``samples/view``); the whole image in files without it."""
        if "samples/view" not in self._f:
            return np.tile(WHOLE_VIEW, (self._n, 1))
        return read_values(self._f["samples/view"]).astype(np.float32)

    def box_mask(self) -> np.ndarray | None:
        """``[N, G, G]`` float32 object coverage of each grid cell, or None if not stored."""
        if "boxes/mask" not in self._f:
            return None
        return read_values(self._f["boxes/mask"]).astype(np.float32)

    def boxes(self) -> pd.DataFrame | None:
        """One row per box: row, id, label, x0, y0, x1, y1, score (pixels); None if absent."""
        if "boxes" not in self._f:
            return None
        b = self._f["boxes"]
        rows = read_values(b["sample"]).astype(np.int64)
        xyxy = read_values(b["xyxy"]).astype(np.float32).reshape(-1, 4)
        ids = read_text(self._f["samples/id"])
        return pd.DataFrame({
            "row": rows, "id": ids[rows] if rows.size else np.array([], dtype=object),
            "label": read_text(b["label"]), "x0": xyxy[:, 0], "y0": xyxy[:, 1],
            "x1": xyxy[:, 2], "y1": xyxy[:, 3], "score": read_values(b["score"]).astype(np.float32),
        })

    def unmatched(self) -> pd.DataFrame | None:
        """Question objects the detector found no box for: row, id, label, reason."""
        if "boxes/unmatched_sample" not in self._f:
            return None
        b = self._f["boxes"]
        rows = read_values(b["unmatched_sample"]).astype(np.int64)
        ids = read_text(self._f["samples/id"])
        return pd.DataFrame({"row": rows, "id": ids[rows] if rows.size else np.array([], dtype=object),
                             "label": read_text(b["unmatched_label"]),
                             "reason": read_text(b["unmatched_reason"])})

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._f.close()

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
            out[k] = read_values(ds, np.s_[r] if lsel is None else np.s_[r, lsel])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k, r in enumerate(rows.tolist()):
            try:
                mask, data = ds.id.read_direct_chunk((r,) + zero)
            except IO_ERRORS as exc:
                raise corrupt_error(ds, exc, (r, r)) from None
            if mask != 0:  # a filter was skipped for this chunk: let HDF5 decode it
                out[k] = read_values(ds, np.s_[r] if lsel is None else np.s_[r, lsel])
                continue
            inflight.append((k, r, pool.submit(_decode_final_chunk, data, shape, lsel, out, k)))
            if len(inflight) > 4 * workers:
                settle()
        while inflight:
            settle()


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
