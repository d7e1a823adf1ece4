"""VSR (Liu et al. 2023), zero-shot split, as a yes/no question over the caption.

Split files ``train/dev/test.jsonl`` live in ``DIR/vsr/`` (or directly in ``DIR``); images
are COCO 2017 under ``DIR/train2017/`` and ``DIR/val2017/`` (the path after ``.org/`` in
``image_link``), with ``DIR/images/<image>`` as a fallback for a flat folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import VislensError
from .base import Sample
from .jsonl import iter_jsonl

__all__ = ["VSR_SPLITS", "VSR_QUESTION", "load_vsr", "find_vsr_file"]

VSR_SPLITS = ("train", "dev", "test")
# The AdaptVis instruction (get_judge_scores_vsr_batched) without its chat template.
VSR_QUESTION = (
    "Determine whether the description about the spatial relationship is correct or not. "
    "Answer with yes or no:"
)
_REQUIRED = ("image", "caption", "label", "relation")


def find_vsr_file(split: str, data_root: str | Path) -> Path:
    """``DIR/vsr/{split}.jsonl``, else ``DIR/{split}.jsonl``; VislensError naming both if neither exists."""
    if split not in VSR_SPLITS:
        raise VislensError(f"unknown VSR split {split!r} (valid: {', '.join(VSR_SPLITS)})")
    root = Path(data_root).expanduser()
    candidates = [root / "vsr" / f"{split}.jsonl", root / f"{split}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VislensError(f"VSR {split} split not found: tried {candidates[0]} and {candidates[1]}")


def _image_path(row: dict[str, Any], root: Path) -> str:
    """COCO path from ``image_link`` (after ``.org/``), or ``DIR/images/<image>`` if only that exists."""
    link = row.get("image_link")
    fallback = root / "images" / row["image"]
    if isinstance(link, str) and ".org/" in link:
        primary = root / link.split(".org/", 1)[1]
        if primary.exists() or not fallback.exists():
            return str(primary)
    return str(fallback)


def _label(value: Any, where: str) -> bool:
    if value in (0, 1) and isinstance(value, (int, bool)):
        return bool(value)
    raise VislensError(f"{where}: field 'label': expected 0 or 1, got {value!r}")


def _vsr_sample(row: dict[str, Any], index: int, split: str, root: Path, where: str) -> Sample:
    for name in _REQUIRED:
        if name not in row:
            raise VislensError(f"{where}: field '{name}': required field is missing")
    for name in ("image", "caption", "relation"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise VislensError(f"{where}: field '{name}': expected a non-empty string")
    true = _label(row["label"], where)
    objects = [row[k] for k in ("subj", "obj") if isinstance(row.get(k), str)]
    return Sample(
        id=f"vsr-{split}-{index}",
        image_path=_image_path(row, root),
        question=f"{VSR_QUESTION} {row['caption'].strip()}",
        options=["Yes", "No"],
        answer="Yes" if true else "No",
        relation=row["relation"],
        objects=objects,
        meta={"caption": row["caption"], "label": int(true), "row": row},
    )


def load_vsr(split: str, data_root: str | Path) -> list[Sample]:
    """Load a VSR zero-shot split; ids are ``vsr-{split}-{0-based line index}``.

    The index counts records (blank lines skipped), so ``vsr-test-{i}`` matches the ``id``
    of AdaptVis's ``VSR_with_answer.jsonl``. Subject/object typos in the source (e.g.
    ``"orse"``, ``"andbag"``) are kept as published.
    """
    root = Path(data_root).expanduser().absolute()
    path = find_vsr_file(split, root)
    samples = [
        _vsr_sample(row, index, split, root, f"{path}:{lineno}")
        for index, (lineno, row) in enumerate(iter_jsonl(path))
    ]
    if not samples:
        raise VislensError(f"{path}: no samples (empty file)")
    return samples
