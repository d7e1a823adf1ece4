"""What the explorer shows, as JSON-ready values read lazily from one capture file.

:class:`ViewerData` is the only part of the viewer that touches the capture, through the
public reader API (:func:`vislens.open_capture`). Nothing is read up front beyond the root
attributes: the results table on the first sample-list request, one sample's attention
(``[L, H, G, G]`` of one condition) when a map is asked for, the attention masses of one
condition for its image-share curve, and one streamed pass per condition for its per-layer
AUROC. Memory stays bounded: a small LRU cache of per-sample arrays, per-condition curves.
The file is opened read-only and never written. A file a job is still writing is followed:
when rows have been committed (or failures recorded) since the caches were filled, every
endpoint drops them and reads again (:meth:`ViewerData.refresh`).
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import metrics
from ..data.base import IMAGE_FORMATS
from ..errors import VislensError
from ..plots import resolve_image, baseline_condition, condition_label
from ..store import Capture, open_capture

#: per-sample attention arrays kept in memory (each ``L*H*G*G`` float32: 2.4 MB for
#: LLaVA-1.5-7B), so that moving the layer slider or switching heads does not re-read
MAP_CACHE = 24
SCALES = ("share", "raw")
#: colour range of the maps: "robust" tops out at the 99.5th percentile of the cells shown
#: (as the figures do: one hot cell does not wash out the rest), "max" at the largest cell
RANGES = ("robust", "max")
ROBUST_PERCENTILE = 99.5
OUTCOMES = ("correct", "incorrect")
CHANGES = ("changed", "unchanged", "fixed", "broken")
#: images a browser shows as they are; anything else is converted to PNG with Pillow
_BROWSER_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                   ".gif": "image/gif", ".webp": "image/webp"}


def _num(x: Any) -> float | None:
    """A float for JSON: NaN/inf become None (JSON has no NaN)."""
    v = float(x)
    return v if math.isfinite(v) else None


def _grid_list(a: np.ndarray) -> list[list[float | None]]:
    return [[_num(v) for v in row] for row in np.asarray(a, dtype=np.float64)]


def _same_answer(a: str, b: str) -> bool:
    return str(a).strip().casefold() == str(b).strip().casefold()


class ViewerData:
    """Lazy, thread-safe read access to one capture for the explorer's JSON endpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.cap: Capture = open_capture(self.path)  # VislensError for a non-capture
        try:
            a = self.cap.attrs
            self.num_layers = int(a["num_layers"])
            self.num_heads = int(a["num_heads"])
            self.grid = int(np.atleast_1d(a["grid"])[0])
            if not self.cap.conditions:
                raise VislensError(f"{self.path}: the capture has no conditions")
            self.labels = {c: condition_label(c, self.cap.condition_attrs(c))
                           for c in self.cap.conditions}
            try:
                self.baseline = baseline_condition(self.cap)
            except VislensError:
                self.baseline = self.cap.conditions[0]
        except KeyError as exc:
            self.cap.close()
            raise VislensError(f"{self.path}: capture lacks root attr {exc.args[0]!r}") from None
        except BaseException:
            self.cap.close()
            raise
        self._lock = threading.Lock()  # guards the caches below
        #: the file's progress (done and failed flags) the caches were filled at, and a
        #: counter bumped whenever it changes (a result computed under an older one is dropped)
        self._state: bytes | None = None
        self._version = 0
        self._table: pd.DataFrame | None = None
        self._samples: pd.DataFrame | None = None
        self._boxes: pd.DataFrame | None | bool = False
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._share: dict[str, dict[str, Any]] = {}
        self._auroc: dict[str, dict[str, Any]] = {}
        self._auroc_locks: dict[str, threading.Lock] = {c: threading.Lock()
                                                        for c in self.cap.conditions}

    def close(self) -> None:
        self.cap.close()

    def refresh(self) -> int:
        """Drop the caches when the file's progress changed since they were filled (a job
        committed rows or recorded failures); returns the cache version to store results under.

        Reads only the small per-sample done and failed flags.
        """
        state = b"".join([np.packbits(self.cap.done(c)).tobytes() for c in self.cap.conditions]
                         + [str(self.cap.n_failed).encode()])
        with self._lock:
            if state != self._state:
                if self._state is not None:
                    self._table = self._samples = None
                    self._maps.clear()
                    self._share.clear()
                    self._auroc.clear()
                    self._version += 1
                self._state = state
            return self._version

    # ------------------------------------------------------------------ validation

    def check_condition(self, name: str | None) -> str:
        if name is None or name == "":
            raise VislensError("missing parameter 'condition'")
        if name not in self.cap.conditions:
            raise VislensError(f"{self.path.name}: no condition {name!r} (have "
                               f"{', '.join(self.cap.conditions)})")
        return name

    def check_row(self, row: int) -> int:
        n = len(self.cap)
        if not 0 <= row < n:
            raise VislensError(f"row {row} is out of range (the capture has {n} samples, 0-{n - 1})")
        return row

    def check_layer(self, layer: int) -> int:
        L = self.num_layers
        if not 0 <= layer < L:
            raise VislensError(f"layer {layer} is out of range (the capture has {L} layers, 0-{L - 1})")
        return layer

    def check_head(self, head: int | None) -> int | None:
        H = self.num_heads
        if head is not None and not 0 <= head < H:
            raise VislensError(f"head {head} is out of range (the capture has {H} heads, 0-{H - 1})")
        return head

    # ------------------------------------------------------------------ cached reads

    def table(self) -> pd.DataFrame:
        """:meth:`Capture.table` of every condition (done rows), read once per file state."""
        with self._lock:
            if self._table is None:
                self._table = self.cap.table()
            return self._table

    def sample_info(self) -> pd.DataFrame:
        with self._lock:
            if self._samples is None:
                self._samples = self.cap.samples
            return self._samples

    def boxes(self) -> pd.DataFrame | None:
        with self._lock:
            if self._boxes is False:
                self._boxes = self.cap.boxes()
            return self._boxes  # type: ignore[return-value]

    def attention(self, row: int, condition: str) -> np.ndarray:
        """``[L, H, G, G]`` float32 attention of one sample and condition (NaN if not done)."""
        key = (row, condition)
        with self._lock:
            version = self._version
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        arr = self.cap.attention(condition, rows=[row])[0]
        with self._lock:
            if version == self._version:  # not read before a change the cache was cleared for
                self._maps[key] = arr
                while len(self._maps) > MAP_CACHE:
                    self._maps.popitem(last=False)
        return arr

    # ------------------------------------------------------------------ endpoints

    def meta(self) -> dict[str, Any]:
        """File-level facts the page needs to build its controls."""
        self.refresh()
        smp = self.sample_info()
        a = self.cap.attrs
        conds = []
        for c in self.cap.conditions:
            attrs = self.cap.condition_attrs(c)
            conds.append({"name": c, "label": self.labels[c], "method": str(attrs.get("method", "")),
                          "spec": str(attrs.get("spec", c)), "done": int(self.cap.done(c).sum())})
        return {
            "file": self.path.name, "model": str(a.get("model", "")),
            "dataset": str(a.get("dataset", "")), "complete": self.cap.complete,
            "n_samples": len(self.cap), "num_layers": self.num_layers,
            "num_heads": self.num_heads, "grid": self.grid, "conditions": conds,
            "baseline": self.baseline,
            "relations": sorted(r for r in smp["relation"].unique() if r),
            "has_boxes": self.boxes() is not None,
        }

    def sample_list(self, condition: str, base: str | None = None, *, relation: str | None = None,
                    outcome: str | None = None, changed: str | None = None,
                    conf_min: float | None = None, conf_max: float | None = None,
                    limit: int = 2000) -> dict[str, Any]:
        """Samples done under ``condition`` that pass the filters, in capture order.

        ``outcome``: correct / incorrect under ``condition``. ``changed`` compares the
        answer under ``condition`` with the one under ``base`` (default: the baseline):
        changed / unchanged (prediction text, case and surrounding blanks ignored), fixed
        (wrong -> right) / broken (right -> wrong). ``conf_min`` / ``conf_max``: inclusive
        range of the confidence under ``condition``.
        """
        condition = self.check_condition(condition)
        base = self.check_condition(base or self.baseline)
        if limit < 0:
            raise VislensError(f"limit {limit}: expected a number of samples >= 0")
        self.refresh()
        if outcome not in (None, "", *OUTCOMES):
            raise VislensError(f"outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
        if changed not in (None, "", *CHANGES):
            raise VislensError(f"changed {changed!r}: expected one of {', '.join(CHANGES)}")
        tab = self.table()
        cur = tab[tab["condition"] == condition].set_index("row")
        ref = tab[tab["condition"] == base].set_index("row")
        ref = ref.reindex(cur.index)
        both = ref["prediction"].notna().to_numpy()
        same = np.array([_same_answer(a, b) for a, b in
                         zip(cur["prediction"], ref["prediction"].fillna(""))], dtype=bool)
        cur = cur.assign(base_prediction=ref["prediction"].fillna(""),
                         base_correct=ref["correct"].fillna(False).astype(bool).to_numpy(),
                         has_base=both, changed=both & ~same)
        keep = np.ones(len(cur), dtype=bool)
        if relation:
            keep &= (cur["relation"] == relation).to_numpy()
        if outcome:
            keep &= cur["correct"].to_numpy(bool) == (outcome == "correct")
        if changed:
            flip_ok = cur["correct"].to_numpy(bool)
            was_ok = cur["base_correct"].to_numpy(bool)
            keep &= both & {"changed": cur["changed"].to_numpy(bool),
                            "unchanged": ~cur["changed"].to_numpy(bool),
                            "fixed": ~was_ok & flip_ok, "broken": was_ok & ~flip_ok}[changed]
        conf = cur["confidence"].to_numpy(float)
        if conf_min is not None:
            keep &= conf >= conf_min
        if conf_max is not None:
            keep &= conf <= conf_max
        sel = cur[keep]
        items = [{"row": int(r), "id": str(s["id"]), "relation": str(s["relation"]),
                  "answer": str(s["answer"]), "prediction": str(s["prediction"]).strip(),
                  "correct": bool(s["correct"]), "confidence": _num(s["confidence"]),
                  "base_prediction": str(s["base_prediction"]).strip(),
                  "changed": bool(s["changed"])}
                 for r, s in sel.head(limit).iterrows()]
        return {"condition": condition, "base": base, "total": int(keep.sum()),
                "of": len(cur), "shown": len(items), "samples": items}

    def sample(self, row: int) -> dict[str, Any]:
        """One sample: question, gold answer, options, image, boxes, and its results per condition."""
        row = self.check_row(row)
        self.refresh()
        s = self.sample_info().iloc[row]
        options = list(s["options"])
        tab = self.table()
        here = tab[tab["row"] == row].set_index("condition")
        results = {}
        for c in self.cap.conditions:
            if c not in here.index:
                results[c] = {"done": False}
                continue
            r = here.loc[c]
            if "option_probs" in here.columns:
                probs = list(r["option_probs"])
            else:
                probs = [r.get(f"p_{o}", np.nan) for o in options]
            results[c] = {"done": True, "prediction": str(r["prediction"]).strip(),
                          "correct": bool(r["correct"]), "confidence": _num(r["confidence"]),
                          "alpha_used": _num(r["alpha_used"]),
                          "option_probs": [_num(p) for p in probs]}
        image = self.image_file(row)
        w, h = int(s["width"]), int(s["height"])
        boxes = self.boxes()
        bx = [] if boxes is None else [
            {"label": str(b["label"]), "x0": _num(b["x0"]), "y0": _num(b["y0"]),
             "x1": _num(b["x1"]), "y1": _num(b["y1"]), "score": _num(b["score"])}
            for _, b in boxes[boxes["row"] == row].iterrows()]
        note = None
        if image is None:
            p = str(s["image_path"])
            note = f"image file not found: {p}" if p else "the capture names no image file"
        return {"row": row, "id": str(s["id"]), "question": str(s["question"]),
                "answer": str(s["answer"]), "options": options, "relation": str(s["relation"]),
                "group": str(s["group"]), "split": str(s["split"]), "width": w, "height": h,
                "image_path": str(s["image_path"]),
                "image_url": f"api/image?row={row}" if image is not None else None,
                "image_note": note, "boxes": bx, "failed": bool(s["failed"]),
                "reason": str(s["reason"]), "results": results}

    def image_file(self, row: int) -> Path | None:
        """The sample's image file, resolved like the figures do (None when missing)."""
        s = self.sample_info().iloc[self.check_row(row)]
        return resolve_image(str(s["image_path"]), self.path.parent)

    def image_bytes(self, row: int) -> tuple[bytes, str]:
        """``(bytes, content type)`` of the sample's image, converted to PNG if a browser
        cannot show its format; VislensError when missing or unreadable."""
        found = self.image_file(row)
        if found is None:
            raise VislensError(f"row {row}: image file not found")
        kind = _BROWSER_IMAGES.get(found.suffix.lower())
        if kind is not None:
            return found.read_bytes(), kind
        import io

        from PIL import Image

        try:
            with Image.open(found, formats=IMAGE_FORMATS) as im:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
        except Exception as exc:
            raise VislensError(f"{found}: cannot read image ({type(exc).__name__})") from None
        return buf.getvalue(), "image/png"

    def map_values(self, row: int, condition: str, layer: int, head: int | None,
                   scale: str = "share", *, refresh: bool = True) -> np.ndarray:
        """``[G, G]`` map of one sample/condition/layer: head mean (``head=None``) or one
        head; ``scale="share"``: % of the map's image attention, ``"raw"``: attention weight.
        ``refresh=False``: the caller has just called :meth:`refresh`."""
        row, condition = self.check_row(row), self.check_condition(condition)
        layer, head = self.check_layer(layer), self.check_head(head)
        if scale not in SCALES:
            raise VislensError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
        if refresh:
            self.refresh()
        a = self.attention(row, condition)[layer].astype(np.float64)  # one small map: exact diffs
        m = a.mean(axis=0) if head is None else a[head]
        return metrics.normalize_maps(m) * 100.0 if scale == "share" else m

    def maps(self, row: int, a: str, b: str, layer: int, head: int | None,
             scale: str = "share", range_: str = "robust") -> dict[str, Any]:
        """Before (``a``) and after (``b``) maps on one colour scale, and ``b - a``.

        ``vmax`` tops the shared scale of the two maps and ``dmax`` the symmetric scale of
        the difference: the 99.5th percentile of their cells (``range_="robust"``) or the
        largest one (``"max"``). A map that is undefined (condition not done, or no image
        attention at all: no share to show) has null values and a ``note``; ``vmax`` /
        ``dmax`` are null when nothing is defined.
        """
        if range_ not in RANGES:
            raise VislensError(f"range {range_!r}: expected one of {', '.join(RANGES)}")
        self.refresh()
        ma = self.map_values(row, a, layer, head, scale, refresh=False)
        mb = self.map_values(row, b, layer, head, scale, refresh=False)
        diff = mb - ma

        def top(m: np.ndarray, how: str = "max") -> float | None:
            v = m[np.isfinite(m)]
            if not v.size:
                return None
            return _num(v.max() if how == "max" else np.percentile(v, ROBUST_PERCENTILE))

        def one(name: str, m: np.ndarray) -> dict[str, Any]:
            ok = bool(np.isfinite(m).any())
            note = None
            if not ok:
                done = np.isfinite(self.attention(row, name)).any()
                note = "no image attention here (every cell is 0)" if done else \
                    "not done under this condition"
            return {"condition": name, "label": self.labels[name], "defined": ok, "note": note,
                    "values": _grid_list(m), "max": top(m),
                    "sum": _num(np.nansum(m)) if ok else None}

        both = np.concatenate([ma.ravel(), mb.ravel()])
        return {"row": row, "layer": layer, "head": "mean" if head is None else head,
                "scale": scale, "range": range_, "grid": self.grid, "a": one(a, ma), "b": one(b, mb),
                "diff": {"values": _grid_list(diff), "max": top(np.abs(diff))},
                "vmax": top(both, range_), "dmax": top(np.abs(diff), range_)}

    def share_curve(self, condition: str) -> dict[str, Any]:
        """Per-layer image share of the answer position's attention: image mass /
        (image + text mass), head mean per sample, averaged over done samples."""
        condition = self.check_condition(condition)
        version = self.refresh()
        with self._lock:
            if condition in self._share:
                return self._share[condition]
        img, txt = self.cap.masses(condition)  # [N, L, H]: small next to the maps
        done = self.cap.done(condition)
        share = metrics.attention_share(img[done].mean(axis=-1), txt[done].mean(axis=-1), 0, 0)
        with warnings.catch_warnings():  # an all-NaN layer is reported as None, not warned
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(share.attention_share, axis=0) if done.any() \
                else np.full(self.num_layers, np.nan)
        out = {"condition": condition, "n": int(done.sum()),
               "share": [_num(v * 100.0) for v in mean]}
        with self._lock:
            if version == self._version:
                self._share[condition] = out
        return out

    def auroc_curve(self, condition: str) -> dict[str, Any]:
        """Per-layer AUROC of the head-mean map's overlap with the object mask for a correct
        answer (as ``vislens report``); one streamed pass over the condition, then cached.
        ``auroc`` is None with a ``note`` when there is no mask or only one class."""
        from ..analysis import condition_stats

        condition = self.check_condition(condition)
        with self._auroc_locks[condition]:  # a second request waits for the first pass
            version = self.refresh()
            if condition in self._auroc:
                return self._auroc[condition]
            out: dict[str, Any] = {"condition": condition, "auroc": None, "note": None}
            mask = self.cap.box_mask()
            if mask is None:
                out["note"] = "no object box mask in the capture (run vislens boxes)"
            elif not self.cap.done(condition).any():
                out["note"] = "no completed samples"
            else:
                st = condition_stats(self.cap, condition, mask=mask)
                df = metrics.per_layer_auroc(st.overlap, st.correct)
                n_pos, n_neg = int(st.correct.sum()), int((~st.correct).sum())
                out.update(n_pos=n_pos, n_neg=n_neg)
                if n_pos == 0 or n_neg == 0:
                    out["note"] = (f"AUROC undefined: all {n_pos + n_neg} answers are "
                                   f"{'correct' if n_neg == 0 else 'incorrect'}")
                else:
                    out["auroc"] = [_num(v) for v in df["auroc"]]
            with self._lock:
                if version == self._version:
                    self._auroc[condition] = out
            return out
