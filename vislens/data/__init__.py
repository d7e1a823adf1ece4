"""Dataset loaders: every benchmark becomes a list of model-independent :class:`Sample` s.

``load_dataset("whatsup:controlled_a", data_root)`` and friends never open images (loading
1000s of samples stays instant); :func:`check_images` opens them on demand so a capture can
report missing or corrupt files up front. See ``docs/datasets.md`` for the folder layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from ..errors import VislensError
from ..registry import Registry
from .base import IMAGE_FORMATS, Box, Sample
from .jsonl import load_jsonl, write_jsonl
from .splits import assign_splits, paper_sample_indices, select_split
from .vsr import VSR_SPLITS, load_vsr
from .whatsup import SUBSETS, load_adaptvis_questions, load_whatsup

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "IMAGE_FORMATS",
    "Box",
    "DatasetLoader",
    "Sample",
    "assign_splits",
    "check_images",
    "load_adaptvis_questions",
    "load_dataset",
    "load_jsonl",
    "load_vsr",
    "load_whatsup",
    "paper_sample_indices",
    "select_split",
    "write_jsonl",
]

#: ``loader(data_root, prompts_dir) -> samples`` of one named dataset
DatasetLoader = Callable[[Path, "str | Path | None"], "list[Sample]"]

#: the named benchmarks ``--dataset`` accepts (``jsonl:PATH`` is handled apart: it takes a path)
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def _whatsup(subset: str) -> DatasetLoader:
    return lambda root, prompts_dir: load_whatsup(subset, root, prompts_dir=prompts_dir)


def _vsr(split: str) -> DatasetLoader:
    return lambda root, prompts_dir: load_vsr(split, root)


for _name in SUBSETS:
    DATASETS.add(f"whatsup:{_name}", _whatsup(_name))
for _name in VSR_SPLITS:
    DATASETS.add(f"vsr:{_name}", _vsr(_name))
del _name

#: the registered dataset names (derived from :data:`DATASETS`; ``jsonl:PATH`` comes on top)
DATASET_NAMES: tuple[str, ...] = DATASETS.names()
_JSONL_PREFIX = "jsonl:"


def _unknown(spec: str) -> VislensError:
    return VislensError(f"unknown dataset {spec!r} (valid: {', '.join(DATASETS.names())}, jsonl:PATH)")


def _need_root(spec: str, data_root: str | Path | None) -> Path:
    if data_root is None:
        raise VislensError(f"dataset {spec!r} needs --data-root (the folder holding its files)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise VislensError(f"{root}: --data-root is not a folder")
    return root


def load_dataset(
    spec: str, data_root: str | Path | None = None, *, prompts_dir: str | Path | None = None
) -> list[Sample]:
    """Load a dataset by name: ``whatsup:<subset>``, ``vsr:<split>`` or ``jsonl:PATH``.

    ``data_root`` is the download folder (ignored for ``jsonl:``, whose PATH is taken as
    given); ``prompts_dir`` overrides ``DATA_ROOT/prompts`` for the AdaptVis question files.
    Other benchmarks join with ``DATASETS.add("name:part", loader)``.
    """
    spec = spec.strip()
    if spec.startswith(_JSONL_PREFIX):
        path = spec[len(_JSONL_PREFIX):]
        if not path:
            raise VislensError("jsonl: needs a path, e.g. jsonl:my_data/questions.jsonl")
        return load_jsonl(Path(path).expanduser())
    if spec not in DATASETS:
        raise _unknown(spec)
    loader = DATASETS.get(spec)
    return loader(_need_root(spec, data_root), prompts_dir)


def _image_problem(path: str) -> str | None:
    """None if ``path`` opens, verifies and decodes as an image, else a short reason.

    ``verify()`` checks PNG checksums but no JPEG data, so the pixels are decoded too: a
    JPEG cut short (an interrupted download) fails only then.
    """
    from PIL import Image  # imported here: loading datasets must not need PIL

    if not path:
        return "no image path"
    if not Path(path).is_file():
        return f"missing: {path}"
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.verify()
        with Image.open(path, formats=IMAGE_FORMATS) as image:  # verify() spends the file
            image.load()
    except Exception as exc:  # PIL raises many types for bad files
        return f"corrupt: {path} ({type(exc).__name__}: {exc})"
    return None


def check_images(samples: Iterable[Sample]) -> list[tuple[str, str]]:
    """Open every sample's image with PIL; return ``(sample id, reason)`` for each bad one.

    Reasons start with ``missing:``, ``corrupt:`` or are ``no image path``. Each distinct
    file is checked once (COCO/VSR images are shared by many samples).
    """
    cache: dict[str, str | None] = {}
    problems: list[tuple[str, str]] = []
    for sample in samples:
        if sample.image_path not in cache:
            cache[sample.image_path] = _image_problem(sample.image_path)
        reason = cache[sample.image_path]
        if reason is not None:
            problems.append((sample.id, reason))
    return problems
