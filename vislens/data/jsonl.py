"""The generic JSONL format for users' own data, and the JSON-lines reader all loaders share.

One object per line::

    {"id": "kitchen-3", "image": "images/kitchen.jpg", "question": "Where is the cup ...?",
     "options": ["Left", "Right"], "answer": "Left", "relation": "left", "group": "cup|plate",
     "objects": ["cup", "plate"], "boxes": [{"label": "cup", "xyxy": [10, 20, 50, 60]}]}

``id``, ``image``, ``question``, ``options`` and ``answer`` are required; ``relation``,
``group``, ``objects``, ``boxes``, ``split`` (``val`` or ``test``: the record's own split,
which ``assign_splits`` keeps) and ``meta`` (a JSON object) are optional. Any other key, or
another split name, is an error, so a typo such as ``"boxs"`` cannot be dropped silently.
``image`` is relative to the JSONL file's folder (absolute paths are kept; ``""`` means no image).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import VislensError
from .base import Box, Sample
from .splits import SAMPLE_SPLITS

__all__ = ["iter_jsonl", "load_jsonl", "write_jsonl", "decode_utf8", "JSONL_FIELDS"]

_REQUIRED = ("id", "image", "question", "options", "answer")
_OPTIONAL = ("relation", "group", "objects", "boxes", "split", "meta")
JSONL_FIELDS: tuple[str, ...] = _REQUIRED + _OPTIONAL


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line (1-based line numbers).

    A missing file, a line that is not JSON, or a line that is not a JSON object raises
    :class:`VislensError` naming ``file:line``, so every loader reports bad input the same way.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise VislensError(f"{path}: file not found") from None
    except OSError as exc:
        raise VislensError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VislensError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise VislensError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def decode_utf8(data: bytes, path: str | Path, lineno: int | None = None) -> str:
    """``data`` (line ``lineno`` of ``path``, or the whole file) as UTF-8 text.

    Bytes that are not UTF-8 raise a one-line :class:`VislensError` naming ``file:line`` and
    the first bad byte's column.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = (lineno or 1) + data.count(b"\n", 0, exc.start)
        raise VislensError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                           f"column {exc.start - line_start + 1}); save the file as UTF-8") from None


def _field_error(where: str, field: str, problem: str) -> VislensError:
    return VislensError(f"{where}: field '{field}': {problem}")


def _require_str(obj: dict[str, Any], field: str, where: str, *, allow_empty: bool) -> str:
    value = obj[field]
    if isinstance(value, int) and not isinstance(value, bool) and field == "id":
        value = str(value)
    if not isinstance(value, str):
        raise _field_error(where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _field_error(where, field, "must not be empty")
    return value


def _str_list(value: Any, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _field_error(where, field, "expected a list of non-empty strings")
    return list(value)


def parse_box(value: Any, where: str) -> Box:
    """Validate one ``{"label", "xyxy"}`` object: 4 finite numbers with x0 < x1 and y0 < y1."""
    if not isinstance(value, dict) or set(value) != {"label", "xyxy"}:
        raise _field_error(where, "boxes", 'each box must be {"label": str, "xyxy": [x0, y0, x1, y1]}')
    label, xyxy = value["label"], value["xyxy"]
    if not isinstance(label, str) or not label.strip():
        raise _field_error(where, "boxes.label", "expected a non-empty string")
    numeric = isinstance(xyxy, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyxy
    )
    if not numeric or len(xyxy) != 4 or not all(math.isfinite(v) for v in xyxy):
        raise _field_error(where, "boxes.xyxy", f"expected 4 finite numbers, got {xyxy!r}")
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    if not (x0 < x1 and y0 < y1):
        raise _field_error(where, "boxes.xyxy", f"need x0 < x1 and y0 < y1, got {xyxy!r}")
    return Box(label=label, xyxy=(x0, y0, x1, y1))


def _given_split(obj: dict[str, Any], where: str) -> str:
    """The record's own split (``""`` when it has no ``split`` field); other names are refused."""
    if "split" not in obj:
        return ""
    value = obj["split"]
    if value not in SAMPLE_SPLITS:
        raise _field_error(where, "split", f"{value!r} is not a split vislens knows (use "
                           f"{' or '.join(SAMPLE_SPLITS)}, or leave the field out for the hash split)")
    return value


def _resolve_image(image: str, folder: str) -> str:
    if not image:
        return ""
    return os.path.normpath(os.path.join(folder, image))


def sample_from_record(obj: dict[str, Any], where: str, folder: str) -> Sample:
    """Build a :class:`Sample` from one validated JSONL object (``where`` = ``file:line``)."""
    missing = [f for f in _REQUIRED if f not in obj]
    if missing:
        raise _field_error(where, missing[0], "required field is missing")
    unknown = sorted(set(obj) - set(JSONL_FIELDS))
    if unknown:
        raise _field_error(where, unknown[0], f"unknown field (allowed: {', '.join(JSONL_FIELDS)})")
    options = _str_list(obj["options"], "options", where)
    if not options:
        raise _field_error(where, "options", "must list at least one option")
    seen: dict[str, str] = {}
    for option in options:  # models are scored on "Left" and "left" alike: one answer
        key = " ".join(option.lower().split())
        if key in seen:
            raise _field_error(where, "options", f"{option!r} repeats {seen[key]!r}")
        seen[key] = option
    answer = _require_str(obj, "answer", where, allow_empty=False)
    if answer not in options:
        raise _field_error(where, "answer", f"{answer!r} is not one of options {options}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _field_error(where, "meta", "expected a JSON object")
    boxes = obj.get("boxes", [])
    if not isinstance(boxes, list):
        raise _field_error(where, "boxes", "expected a list")
    split = _given_split(obj, where)
    return Sample(
        id=_require_str(obj, "id", where, allow_empty=False),
        image_path=_resolve_image(_require_str(obj, "image", where, allow_empty=True), folder),
        question=_require_str(obj, "question", where, allow_empty=False),
        options=options,
        answer=answer,
        relation=_require_str(obj, "relation", where, allow_empty=True) if "relation" in obj else "",
        group=_require_str(obj, "group", where, allow_empty=True) if "group" in obj else "",
        objects=_str_list(obj["objects"], "objects", where) if "objects" in obj else [],
        boxes=[parse_box(b, where) for b in boxes],
        split=split,
        meta=dict(meta),
        given_split=split,
    )


def load_jsonl(path: str | Path) -> list[Sample]:
    """Load a user dataset in the generic JSONL format; image paths become absolute.

    Validation errors name ``file:line`` and the field; duplicate ids are rejected because
    ids key captures and splits.
    """
    path = Path(path)
    folder = os.path.dirname(os.path.abspath(path))
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        sample = sample_from_record(obj, where, folder)
        if sample.id in seen:
            raise _field_error(where, "id", f"duplicate id {sample.id!r} (first on line {seen[sample.id]})")
        seen[sample.id] = lineno
        samples.append(sample)
    if not samples:
        raise VislensError(f"{path}: no samples (empty file)")
    return samples


def _relative_image(image_path: str, folder: str) -> str:
    if not image_path:
        return ""
    try:
        rel = os.path.relpath(os.path.abspath(image_path), folder)
    except ValueError:  # different drive on Windows: keep it absolute
        return Path(os.path.abspath(image_path)).as_posix()
    return Path(rel).as_posix()


def record_from_sample(sample: Sample, folder: str) -> dict[str, Any]:
    """The JSONL object for one sample, image path relative to ``folder``; optional fields only when set."""
    record: dict[str, Any] = {
        "id": sample.id,
        "image": _relative_image(sample.image_path, folder),
        "question": sample.question,
        "options": list(sample.options),
        "answer": sample.answer,
    }
    if sample.relation:
        record["relation"] = sample.relation
    if sample.group:
        record["group"] = sample.group
    if sample.objects:
        record["objects"] = list(sample.objects)
    if sample.boxes:
        record["boxes"] = [{"label": b.label, "xyxy": [float(v) for v in b.xyxy]} for b in sample.boxes]
    if sample.split or sample.given_split:  # read back as the record's own split
        record["split"] = sample.split or sample.given_split
    if sample.meta:
        record["meta"] = sample.meta
    return record


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples in the generic JSONL format (the inverse of :func:`load_jsonl`).

    Image paths are written relative to the file's folder so the folder can be moved as a
    whole. The file is written to a temporary name and renamed, so a failure (e.g. a
    ``meta`` value that is not JSON-serialisable) never leaves a half-written dataset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.dirname(os.path.abspath(path))
    lines = []
    for sample in samples:
        if sample.answer not in sample.options:
            raise VislensError(
                f"sample {sample.id!r}: answer {sample.answer!r} is not one of options {sample.options}"
            )
        try:
            lines.append(json.dumps(record_from_sample(sample, folder), ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise VislensError(f"sample {sample.id!r}: cannot write to {path} as JSON ({exc})") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
