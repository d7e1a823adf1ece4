"""The record every dataset loader yields: one question about one image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The image formats vislens opens, as Pillow identifies them from the file's content (not
#: its name): photographs and screenshots ("JPEG" covers multi-picture MPO files too).
#: Pass as ``Image.open(path, formats=IMAGE_FORMATS)``. Others are refused: Pillow hands
#: EPS/PostScript to Ghostscript, an external interpreter, whatever the file is called, and
#: an image from someone else's dataset is untrusted data.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")


@dataclass(frozen=True)
class Box:
    """An object box in pixels of the original image, ``xyxy = (x0, y0, x1, y1)``."""

    label: str
    xyxy: tuple[float, float, float, float]


@dataclass
class Sample:
    """One benchmark item, independent of any model's prompt format.

    ``question`` is the plain question text (no chat template, no image token): each model
    adapter wraps it in its own template. ``answer`` is one of ``options``; ``objects`` are
    the object names the question asks about (subject first), used to pick detector boxes.
    ``split`` is the sample's split (``val``/``test``, set by ``assign_splits``);
    ``given_split`` is the one its dataset names (the JSONL ``split`` field), which
    ``assign_splits`` keeps instead of hashing.
    """

    id: str
    image_path: str
    question: str
    options: list[str]
    answer: str
    relation: str = ""
    group: str = ""
    objects: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    given_split: str = ""
