"""Object boxes for the question's objects, and their coverage of the analysis grid.

The attention maps vislens analyses live on a canonical ``G x G`` grid laid over the *original*
image (see :mod:`vislens.models.layout`). :func:`box_mask` puts object boxes on the same grid
(exact area coverage), so "how much attention falls on the subject" is one dot product for
every model layout. Boxes come either from the dataset itself (:func:`annotation_boxes`) or
from an offline YOLO detector (:func:`detect_boxes`); both return one
:class:`DetectionResult` per sample with one record per question object, in question order.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data.base import IMAGE_FORMATS, Sample
from .errors import VislensError

__all__ = [
    "COCO_SYNONYMS", "Detection", "Unmatched", "DetectionResult", "box_mask", "box_masks",
    "check_box_pixels",
    "coco_class_for", "coco_names", "match_detections", "detect_boxes", "annotation_boxes",
    "annotation_objects",
]

# ---------------------------------------------------------------------------------------------
# Box coverage of the analysis grid
# ---------------------------------------------------------------------------------------------

_SNAP = 1e-9  # box edges this close (in cell units) to a cell edge are put exactly on it


def _check_size(image_size: tuple[int, int]) -> tuple[float, float]:
    try:
        w, h = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise VislensError(f"image_size must be (width, height), got {image_size!r}") from None
    if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
        raise VislensError(f"image_size must be positive (width, height), got {image_size!r}")
    return w, h


def _as_boxes(boxes_xyxy: Any) -> np.ndarray:
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise VislensError(f"boxes must be an [M, 4] array of xyxy pixels, got shape {boxes.shape}")
    return boxes


def _normalised_boxes(boxes: np.ndarray, w: float, h: float, grid: int,
                      edges: np.ndarray, view: np.ndarray) -> np.ndarray:
    """Pixel boxes -> [0, 1] boxes clipped to ``view`` (the image, or the part the model
    sees), edges snapped onto cell edges.

    Snapping removes float slivers (a box ending at pixel 20 of a 240-px image vs the cell
    edge 2/24), so cells a box does not touch are exactly 0. Empty/NaN boxes are dropped.
    """
    b = boxes / np.array([w, h, w, h])
    b = np.clip(b, np.r_[view[:2], view[:2]], np.r_[view[2:], view[2:]])
    k = np.rint(b * grid)
    snap = np.abs(b * grid - k) < _SNAP
    b = np.where(snap, edges[np.nan_to_num(k, nan=0).astype(int)], b)
    ok = np.isfinite(b).all(axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[ok]


def _axis_pieces(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate compression along one axis.

    Splits [0, 1] at every cell edge and box edge. Returns ``inside`` [M, P] (piece p lies in
    box m) and ``share`` [P, G] (piece p's length as a fraction of the cell that holds it).
    """
    grid = len(edges) - 1
    cuts = np.unique(np.concatenate([edges, lo, hi]))
    mid = (cuts[:-1] + cuts[1:]) / 2
    inside = (lo[:, None] <= mid) & (mid < hi[:, None])
    cell = np.minimum((mid * grid).astype(int), grid - 1)
    share = np.zeros((len(mid), grid))
    share[np.arange(len(mid)), cell] = np.diff(cuts) * grid
    return inside, share


def _check_view(view: Any) -> np.ndarray:
    """A normalised ``(x0, y0, x1, y1)`` rectangle inside [0, 1]^2 (None: the whole image)."""
    if view is None:
        return np.array([0.0, 0.0, 1.0, 1.0])
    v = np.asarray(view, dtype=np.float64).reshape(-1)
    if v.shape != (4,) or not np.isfinite(v).all() or (v[:2] < 0).any() or (v[2:] > 1).any() \
            or v[2] < v[0] or v[3] < v[1]:
        raise VislensError(f"view must be a normalised (x0, y0, x1, y1) rectangle in [0, 1], "
                           f"got {view!r}")
    return v


def box_mask(boxes_xyxy: np.ndarray, image_size: tuple[int, int], grid: int = 24, *,
             visible: np.ndarray | None = None, view: Any = None) -> np.ndarray:
    """[G, G] float32: the fraction of each analysis-grid cell covered by the union of boxes.

    ``boxes_xyxy`` [M, 4] are pixels of the original ``image_size = (W, H)`` image; boxes are
    clipped to the image and overlaps count once. The area is exact (coordinate compression
    over box and cell edges, no sampling). ``view`` (e.g. ``layout.view`` or a capture's
    ``samples/view`` row: the normalised rectangle the model sees) clips the boxes first, so
    each cell counts only the object area the model saw (a centre crop hides the sides of a
    wide image); in a cell the box fills, that is the cell's visible fraction. ``visible``
    (e.g. ``layout.visible(grid)``) instead scales each cell by its visible fraction, exact
    only where a box fills its cells. Rows are y, columns x.
    """
    if int(grid) != grid or grid < 1:
        raise VislensError(f"grid must be a positive integer, got {grid!r}")
    grid = int(grid)
    w, h = _check_size(image_size)
    boxes = _as_boxes(boxes_xyxy)
    v = _check_view(view)
    if visible is not None:
        visible = np.asarray(visible, dtype=np.float64)
        if visible.shape != (grid, grid):
            raise VislensError(f"visible must have shape {(grid, grid)}, got {visible.shape}")
    mask = np.zeros((grid, grid))
    edges = np.linspace(0.0, 1.0, grid + 1)
    b = _normalised_boxes(boxes, w, h, grid, edges, v)
    if len(b):
        in_x, share_x = _axis_pieces(b[:, 0], b[:, 2], edges)  # [M, Px], [Px, G]
        in_y, share_y = _axis_pieces(b[:, 1], b[:, 3], edges)  # [M, Py], [Py, G]
        covered = (in_y.T.astype(np.float64) @ in_x.astype(np.float64)) > 0  # [Py, Px] union
        mask = np.clip(share_y.T @ covered.astype(np.float64) @ share_x, 0.0, 1.0)
    if visible is not None:
        mask = mask * visible
    return mask.astype(np.float32)


def check_box_pixels(sample_id: str, label: str, xyxy: Sequence[float],
                     image_size: tuple[int, int]) -> None:
    """Refuse a dataset box that cannot be xyxy pixels of its ``(W, H)`` image: one lying
    wholly outside it, or one whose coordinates all lie in [0, 1] (fractions of the image,
    as YOLO labels give them). Either would make an empty mask without a word."""
    w, h = _check_size(image_size)
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    shown = f"sample {sample_id}: box {label!r} {[x0, y0, x1, y1]}"
    if w > 1 and h > 1 and min(x0, y0) >= 0 and max(x1, y1) <= 1:
        raise VislensError(f"{shown}: all coordinates are in [0, 1] of a {w:g}x{h:g} image; "
                           f"boxes are xyxy pixels of the original image, not fractions of it")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise VislensError(f"{shown} lies outside its {w:g}x{h:g} image (boxes are xyxy "
                           f"pixels of the original image)")


def box_masks(samples_boxes: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
              grid: int = 24, *,
              visible: Sequence[np.ndarray | None] | np.ndarray | None = None,
              views: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """[N, G, G]: :func:`box_mask` of each sample's boxes (``visible``/``views`` optional,
    per sample)."""
    if len(samples_boxes) != len(sizes):
        raise VislensError(f"got boxes for {len(samples_boxes)} samples but {len(sizes)} sizes")
    for name, per in (("visible masks", visible), ("views", views)):
        if per is not None and len(per) != len(sizes):
            raise VislensError(f"got {len(per)} {name} for {len(sizes)} samples")
    out = np.zeros((len(sizes), grid, grid), dtype=np.float32)
    for i, (boxes, size) in enumerate(zip(samples_boxes, sizes)):
        out[i] = box_mask(boxes, size, grid, visible=None if visible is None else visible[i],
                          view=None if views is None else views[i])
    return out


# ---------------------------------------------------------------------------------------------
# Object names -> COCO classes
# ---------------------------------------------------------------------------------------------

# Each COCO class (as named by ultralytics' COCO models) with the words VSR / WhatsUp
# questions use for it. Only unambiguous aliases: "glass" (cup or wine glass?) or "bag"
# (handbag, backpack, suitcase?) are left out on purpose. Plurals need no entry (see
# ``_singulars``); multi-word names also try their trailing words ("black cat" -> "cat").
_SYNONYM_GROUPS: dict[str, tuple[str, ...]] = {
    "person": ("man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "people", "player", "toddler", "baby", "lady", "guy", "human"),
    "dining table": ("table", "desk", "dinner table", "kitchen table"),
    "tv": ("television", "monitor", "tv screen", "tv set"),
    "couch": ("sofa",),
    "cell phone": ("cellphone", "phone", "mobile phone", "smartphone"),
    "bicycle": ("bike",),
    "motorcycle": ("motorbike",),
    "airplane": ("plane", "aeroplane", "jet"),
    "cup": ("mug", "teacup"),
    "chair": ("armchair",),
    "wine glass": ("wineglass",),
    "hot dog": ("hotdog",),
    "donut": ("doughnut",),
    "laptop": ("notebook computer",),
    "refrigerator": ("fridge",),
    "potted plant": ("houseplant", "plant"),
    "teddy bear": ("teddy",),
    "sports ball": ("ball", "football", "soccer ball", "baseball", "tennis ball"),
    "tennis racket": ("racket", "racquet"),
    "fire hydrant": ("hydrant",),
    "hair drier": ("hair dryer", "hairdryer"),
    "handbag": ("purse",),
    "cat": ("kitten",),
    "dog": ("puppy",),
    "car": ("taxi",),
    "remote": ("remote control",),
}

#: Alias -> COCO class name (derived from the grouped table above; lower-case keys).
COCO_SYNONYMS: dict[str, str] = {alias: cls for cls, aliases in _SYNONYM_GROUPS.items()
                                 for alias in aliases}

_ARTICLES = ("the ", "a ", "an ")


def _normalise(name: str) -> str:
    """Lower-case, ``-``/``_`` as spaces, single spaces, no leading article."""
    text = re.sub(r"[\s_\-]+", " ", str(name).lower()).strip()
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
    return text


def _singulars(phrase: str) -> list[str]:
    """Possible singular forms of a phrase's last word ("knives" -> "knife", "buses" -> "bus")."""
    head, _, last = phrase.rpartition(" ")
    prefix = f"{head} " if head else ""
    forms: list[str] = []
    if last.endswith("ies") and len(last) > 4:
        forms.append(last[:-3] + "y")
    if last.endswith("ves") and len(last) > 4:
        forms += [last[:-3] + "f", last[:-3] + "fe"]
    if last.endswith("es") and len(last) > 3:
        forms.append(last[:-2])
    if last.endswith("s") and not last.endswith("ss") and len(last) > 2:
        forms.append(last[:-1])
    return [prefix + f for f in forms]


def _name_keys(name: str) -> list[str]:
    """Candidate class names for an object name, most specific first.

    The whole phrase, then its trailing words ("red wine glass" -> "wine glass" -> "glass");
    each as written, singularised, and through :data:`COCO_SYNONYMS`.
    """
    words = _normalise(name).split()
    keys: list[str] = []
    for i in range(len(words)):
        phrase = " ".join(words[i:])
        for form in (phrase, *_singulars(phrase)):
            keys.append(form)
            if form in COCO_SYNONYMS:
                keys.append(COCO_SYNONYMS[form])
    return list(dict.fromkeys(keys))


def coco_class_for(name: str, class_names: dict[int, str] | Iterable[str]) -> str | None:
    """The detector class (from ``class_names``, e.g. ``model.names``) an object name means.

    Tries the name itself, its singular, :data:`COCO_SYNONYMS`, then the same for its trailing
    words ("black cat" -> "cat"). Returns the class name as the detector spells it, or None.
    """
    values = class_names.values() if isinstance(class_names, dict) else class_names
    by_key = {_normalise(c): c for c in values}
    for key in _name_keys(name):
        if key in by_key:
            return by_key[key]
    return None


def coco_names() -> dict[int, str]:
    """The 80 COCO class names, as ultralytics' COCO-trained models name them (offline).

    Useful as ``class_names`` for a model whose own names are placeholders (an untrained
    ``yolov8n.yaml`` names its classes "0".."79").
    """
    _prepare_ultralytics()
    from ultralytics.utils import ROOT, YAML

    names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    return {int(k): str(v) for k, v in names.items()}


# ---------------------------------------------------------------------------------------------
# Per-object results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    """The box chosen for one question object.

    ``label`` is the question's object name; ``coco_class`` the detector class it matched
    (for :func:`annotation_boxes`, the annotation's own label); ``xyxy`` pixels of the
    original image; ``score`` the detector confidence (1.0 for annotations).
    """

    label: str
    coco_class: str
    xyxy: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class Unmatched:
    """A question object with no box, and why (so missing boxes are never silent)."""

    label: str
    reason: str


@dataclass
class DetectionResult:
    """Boxes for one sample: one record per question object, in ``Sample.objects`` order.

    ``image_size`` is (W, H) of the original image (None if the image could not be read).
    """

    sample_id: str
    image_path: str
    image_size: tuple[int, int] | None
    objects: list[Detection | Unmatched] = field(default_factory=list)

    @property
    def detections(self) -> list[Detection]:
        return [o for o in self.objects if isinstance(o, Detection)]

    @property
    def unmatched(self) -> list[Unmatched]:
        return [o for o in self.objects if isinstance(o, Unmatched)]

    @property
    def xyxy(self) -> np.ndarray:
        """[M, 4] pixel boxes of the matched objects (question order), for :func:`box_mask`."""
        return np.array([d.xyxy for d in self.detections], dtype=np.float64).reshape(-1, 4)

    def box(self, name: str) -> Detection | None:
        """The detection of question object ``name`` (None if unmatched or absent)."""
        return next((d for d in self.detections if d.label == name), None)


def match_detections(objects: Sequence[str], xyxy: np.ndarray, scores: np.ndarray,
                     classes: np.ndarray, class_names: dict[int, str], conf: float = 0.0,
                     ) -> list[Detection | Unmatched]:
    """Pick, for each object name, the best-scoring detection of its class.

    ``xyxy`` [K, 4], ``scores`` [K], ``classes`` [K] (class ids into ``class_names``) are one
    image's raw detections. Detections below ``conf`` are ignored. Objects are served in order
    and a detection is used once, so "the man ... the woman" (both ``person``) get the two best
    person boxes rather than the same one twice.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(int)
    if not (len(xyxy) == len(scores) == len(classes)):
        raise VislensError(f"detections disagree: {len(xyxy)} boxes, {len(scores)} scores, "
                           f"{len(classes)} classes")
    used = np.zeros(len(scores), dtype=bool)
    out: list[Detection | Unmatched] = []
    for name in objects:
        cls = coco_class_for(name, class_names)
        if cls is None:
            out.append(Unmatched(name, f"no COCO class for {name!r}"))
            continue
        ids = [k for k, v in class_names.items() if v == cls]
        hits = np.isin(classes, ids) & (scores >= conf)
        free = hits & ~used
        if not free.any():
            why = " left after earlier objects" if hits.any() else ""
            out.append(Unmatched(name, f"no detection of class {cls!r} above conf {conf:g}{why}"))
            continue
        k = int(np.flatnonzero(free)[np.argmax(scores[free])])
        used[k] = True
        out.append(Detection(name, cls, tuple(float(v) for v in xyxy[k]), float(scores[k])))
    return out


def _label_match(name: str, labels: Sequence[str], used: np.ndarray) -> int | None:
    """Index of the first unused label equal to ``name``, else the first synonym match."""
    target = _normalise(name)
    for i, label in enumerate(labels):
        if not used[i] and _normalise(label) == target:
            return i
    label_keys = [set(_name_keys(label)) for label in labels]
    for key in _name_keys(name):
        for i, keys in enumerate(label_keys):
            if not used[i] and key in keys:
                return i
    return None


def _header_size(path: str) -> tuple[int, int] | None:
    """(W, H) from the image header (no decoding), or None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return tuple(int(v) for v in im.size)  # type: ignore[return-value]
    except Exception:  # missing or unreadable: annotations do not need the pixels
        return None


def annotation_boxes(samples: Sequence[Sample]) -> list[DetectionResult]:
    """:class:`DetectionResult` per sample from the dataset's own ``Sample.boxes``.

    Each question object takes the first unused box whose label equals its name
    (case-insensitive), else one whose label means the same (:func:`coco_class_for` rules:
    singulars, synonyms, trailing words). ``image_size`` is read from the image header when
    the file exists.
    """
    return [DetectionResult(s.id, s.image_path, _header_size(s.image_path), annotation_objects(s))
            for s in samples]


def annotation_objects(s: Sample) -> list[Detection | Unmatched]:
    """One record per question object of ``s``: its annotated box (rule of
    :func:`annotation_boxes`) or why it has none. Capture-time masks use the same choice.

    The question objects are ``s.objects``, else those a WhatsUp-style question names
    (:func:`objects_from_question`); a sample naming none counts every annotated box.
    """
    names = s.objects or objects_from_question(s.question)
    if not names:
        return [Detection(b.label, b.label, tuple(float(v) for v in b.xyxy), 1.0) for b in s.boxes]
    labels = [b.label for b in s.boxes]
    used = np.zeros(len(labels), dtype=bool)
    objects: list[Detection | Unmatched] = []
    for name in names:
        i = _label_match(name, labels, used)
        if i is None:
            reason = (f"no annotated box labelled {name!r} (labels: {', '.join(labels)})"
                      if labels else "sample has no annotated boxes")
            objects.append(Unmatched(name, reason))
            continue
        used[i] = True
        box = s.boxes[i]
        objects.append(Detection(name, box.label, tuple(float(v) for v in box.xyxy), 1.0))
    return objects


# ---------------------------------------------------------------------------------------------
# YOLO detection (ultralytics, strictly offline)
# ---------------------------------------------------------------------------------------------

_YAML_SUFFIXES = (".yaml", ".yml")


def _default_config_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "vislens" / "ultralytics"


def _prepare_ultralytics() -> Path:
    """Make ultralytics offline-safe before (and after) it is imported; return its config dir.

    ``YOLO_CONFIG_DIR`` (kept if the user set it) keeps its settings out of ~/.config;
    ``YOLO_OFFLINE=1`` stops its DNS probes, update checks and telemetry; a local TTF placed
    as ``Arial.ttf`` stops its font download when plotting. Env vars are read at import, so if
    ultralytics was imported earlier its own config dir is used for the font.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        config = Path(USER_CONFIG_DIR)
    else:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(_default_config_dir()))
        config = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser() / "Ultralytics"
    font = config / "Arial.ttf"
    if not font.exists():
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        try:
            config.mkdir(parents=True, exist_ok=True)
            tmp = font.with_suffix(f".tmp{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, font)  # atomic: parallel workers never see half a font
        except OSError:
            pass  # read-only config dir: plotting may warn, detection still works offline
    return config


def _check_weights(weights: str | Path) -> str:
    """A local ``.pt`` checkpoint, or the bare name of a model ``.yaml`` bundled with ultralytics.

    Everything else is refused before any work: other weight formats (vislens reads only
    ``.pt`` files, through its weights-only reader) and ``.yaml`` files on disk (ultralytics
    evaluates parts of a model ``.yaml`` as Python code while building the model).
    """
    path = Path(weights).expanduser()
    suffix = path.suffix.lower()
    if suffix in _YAML_SUFFIXES:
        if path.parent == Path(".") and not path.exists():
            return str(weights)  # e.g. "yolov8n.yaml": resolved from ultralytics' bundled configs
        raise VislensError(f"{weights}: a model .yaml is accepted only as the name of one of "
                           f"ultralytics' bundled configs (e.g. yolov8n.yaml), never as a file "
                           f"(ultralytics runs code from model .yaml files)")
    if suffix != ".pt":
        raise VislensError(f"{weights}: detector weights must be an ultralytics .pt checkpoint "
                           f"(got {suffix or 'no suffix'}; other formats are refused)")
    if not path.is_file():
        raise VislensError(f"detector weights not found: {weights} (give the path of a local "
                           f".pt file; vislens never downloads weights)")
    return str(path)


#: Tasks whose results carry ``boxes`` (classification / OBB models have none).
_BOX_TASKS = ("detect", "segment", "pose")
#: Modules whose ``nn.Module`` classes a YOLO checkpoint may name; loss/assigner modules may
#: also contribute plain classes (some checkpoints pickle the training criterion).
_MODULE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.")
_CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")


def _no_init(cls: type) -> type:
    """A stand-in for ``cls`` that makes bare instances and never runs ``cls.__init__``.

    ``torch.save`` pickles objects as "new instance, then state", which the stand-in serves;
    a crafted checkpoint that instead *calls* an allowed class gets a bare instance too, so it
    cannot run a constructor with arguments of its choosing.
    """
    def make(_stand_in: type, *args: Any, **kwargs: Any) -> Any:
        return cls.__new__(cls)

    return type(f"NoInit{cls.__name__}", (), {"__new__": make, "real_class": cls})


def _restricted_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as YOLO checkpoints use it (``Detect.forward``): module methods only."""
    import torch

    if isinstance(obj, torch.nn.Module) and name in ("forward", "forward_fuse"):
        return getattr(obj, name)
    raise VislensError(f"checkpoint asks for getattr({type(obj).__name__}, {name!r}), which "
                       f"vislens does not allow")


def _allowed_global(name: str) -> Any | None:
    """The object a YOLO checkpoint may reference as ``name``, or None (refused)."""
    import importlib
    import pathlib

    import torch

    module, _, attr = name.rpartition(".")
    if name == "builtins.getattr":
        return _restricted_getattr
    if name in ("ultralytics.utils.IterableSimpleNamespace",
                "ultralytics.yolo.utils.IterableSimpleNamespace"):
        from ultralytics.utils import IterableSimpleNamespace

        return _no_init(IterableSimpleNamespace)
    if module in ("pathlib", "pathlib._local") and attr in ("PosixPath", "WindowsPath"):
        return pathlib.PurePosixPath if attr == "PosixPath" else pathlib.PureWindowsPath
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and attr == "scalar":
        return np.float64(0).__reduce__()[0]
    if module in ("numpy", "numpy.dtypes"):
        obj = getattr(np, attr, None) if module == "numpy" else getattr(np.dtypes, attr, None)
        return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
    if not (module.startswith(_MODULE_PREFIXES) or module in _CLASS_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    if issubclass(obj, torch.nn.Module) or module in _CLASS_MODULES:
        return _no_init(obj)
    return None


def _safe_checkpoint(path: str) -> dict[str, Any]:
    """Read an ultralytics ``.pt`` checkpoint without unpickling anything but model data.

    The pickle's globals are listed without running it; any outside the allow-list (torch and
    ultralytics ``nn.Module`` classes, ultralytics' loss classes and argument namespace, numpy
    scalars, paths) is refused in one line. The rest loads with ``torch.load(weights_only=True)``.
    """
    import secrets

    import torch

    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise VislensError(f"{path}: reading .pt detector weights safely needs torch >= 2.6 "
                           f"(installed: {torch.__version__})")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip archive, truncated, ...: torch raises several types
        raise VislensError(f"{path}: not a checkpoint written by torch.save "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                           ) from None
    token = secrets.token_hex(8)  # unguessable alias: the real class, for restoring state only
    entries: list[tuple[Any, str]] = []
    for name in names:
        obj = _allowed_global(name)
        if obj is None:
            raise VislensError(f"{path}: refusing to load: the checkpoint references {name}, "
                               f"which is not part of a torch/ultralytics model (vislens never "
                               f"unpickles arbitrary objects)")
        entries.append((obj, name))
        real = getattr(obj, "real_class", None)
        if real is not None:  # restoring state checks the instance's real class
            entries.append((real, f"vislens-{token}.{name}"))
    try:
        with torch.serialization.safe_globals(entries):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except VislensError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (corrupt zip), ...
        lines = [l for l in str(exc).splitlines() if l.strip()]
        detail = next((l for l in lines if "GLOBAL" in l or "Unsupported" in l),
                      lines[0] if lines else type(exc).__name__)
        raise VislensError(f"{path}: cannot load the checkpoint safely ({detail.strip()})") from None
    if not isinstance(ckpt, dict):
        raise VislensError(f"{path}: not an ultralytics checkpoint (holds a {type(ckpt).__name__})")
    return ckpt


def _checkpoint_model(path: str, ckpt: dict[str, Any]) -> Any:
    """The checkpoint's detection model in eval mode, fp32, as ultralytics prepares it."""
    import torch
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import guess_model_task

    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, torch.nn.Module):
        raise VislensError(f"{path}: not an ultralytics checkpoint (no model in it)")
    try:
        model = model.float()
        train_args = ckpt.get("train_args") or {}
        model.args = {**DEFAULT_CFG_DICT, **dict(train_args)}
        model.pt_path = str(path)
        if not hasattr(model, "task"):
            model.task = guess_model_task(model)
        if not hasattr(model, "stride"):
            model.stride = torch.tensor([32.0])
        model.eval()
        for m in model.modules():
            if hasattr(m, "inplace"):
                m.inplace = True
            elif isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
                m.recompute_scale_factor = None
    except Exception as exc:  # a crafted or damaged model object
        raise VislensError(f"{path}: not a usable ultralytics model ({type(exc).__name__}: "
                           f"{exc})") from None
    if model.task not in _BOX_TASKS:
        raise VislensError(f"{path}: a {model.task!r} model gives no boxes; vislens needs a "
                           f"detection model ({', '.join(_BOX_TASKS)})")
    return model


def _bundled_config(name: str) -> str:
    """The absolute path of ultralytics' bundled model config ``name`` (e.g. ``yolov8n.yaml``).

    Given a bare name, ultralytics looks in the working directory first, also under names it
    derives (``yolov8.yaml`` for ``yolov8n.yaml``, ``yolov5n.yaml`` for ``yolov5nu.yaml``), and
    evaluates parts of the file it finds as Python. An absolute path inside its own
    ``cfg/models`` folders leaves it nowhere else to look; its own resolution
    (``yaml_model_load``) decides which bundled file a name means.
    """
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import ROOT

    models = Path(ROOT) / "cfg" / "models"
    for folder in [models, *sorted(p for p in models.rglob("*") if p.is_dir())]:
        candidate = folder / name
        try:
            yaml_model_load(candidate)
        except FileNotFoundError:
            continue
        return str(candidate)
    raise VislensError(f"cannot build detector {name}: not one of ultralytics' bundled model "
                       f"configs (e.g. yolov8n.yaml)")


def _load_detector(weights: str) -> Any:
    """An ultralytics YOLO model from a local ``.pt`` file (read safely) or a bundled ``.yaml``."""
    _prepare_ultralytics()
    from ultralytics import YOLO

    if Path(weights).suffix.lower() in _YAML_SUFFIXES:
        try:
            return YOLO(_bundled_config(weights))
        except Exception as exc:  # ultralytics raises many types for unknown configs
            raise VislensError(f"cannot build detector {weights}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    ckpt = _safe_checkpoint(weights)
    model = _checkpoint_model(weights, ckpt)

    class CheckedYOLO(YOLO):
        """ultralytics' YOLO around a model vislens has already read safely."""

        def _load(self, path: str, task: str | None = None) -> None:  # replaces the unpickling
            self.model, self.ckpt = model, ckpt
            self.task = model.task
            self.overrides = model.args = self._reset_ckpt_args(model.args)
            self.overrides.update(model=path, task=self.task)
            self.ckpt_path = self.model_name = path

    try:
        return CheckedYOLO(weights)
    except Exception as exc:
        raise VislensError(f"cannot load detector {weights}: {type(exc).__name__}: {exc}") from exc


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _raw_detections(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyxy [K, 4], scores [K], class ids [K]) of one ultralytics ``Results``."""
    boxes = result.boxes
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)
    return (_to_numpy(boxes.xyxy).reshape(-1, 4), _to_numpy(boxes.conf).reshape(-1),
            _to_numpy(boxes.cls).reshape(-1).astype(int))


def _read_rgb(path: str) -> Any:
    """The image as RGB PIL, orientation as stored (like every vislens adapter sees it)."""
    from PIL import Image

    with Image.open(path, formats=IMAGE_FORMATS) as im:
        return im.convert("RGB")


def _skipped(s: Sample, reason: str) -> DetectionResult:
    return DetectionResult(s.id, s.image_path, None, [Unmatched(o, reason) for o in s.objects])


def detect_boxes(samples: Sequence[Sample], weights: str | Path, *, conf: float = 0.25,
                 batch: int = 16, device: str | None = None, on_error: str = "raise",
                 class_names: dict[int, str] | None = None) -> list[DetectionResult]:
    """Detect each sample's question objects with a YOLO model, offline.

    Returns one :class:`DetectionResult` per sample: per object the best-scoring detection of
    its COCO class (:func:`match_detections`) or an :class:`Unmatched` with the reason.
    ``weights`` is a local weights file, or a bundled model ``.yaml`` (untrained; for tests).
    ``class_names`` overrides the model's own names (e.g. :func:`coco_names` for a ``.yaml``
    model). A missing weights file or image raises :class:`VislensError` before any work;
    with ``on_error="skip"`` unreadable images are recorded as unmatched instead.
    """
    if on_error not in ("raise", "skip"):
        raise VislensError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not 0.0 <= conf <= 1.0:
        raise VislensError(f"conf must be in [0, 1], got {conf}")
    if int(batch) != batch or batch < 1:
        raise VislensError(f"batch must be a positive integer, got {batch!r}")
    weights = _check_weights(weights)
    bad: dict[int, str] = {}
    for i, s in enumerate(samples):
        if not s.image_path or not Path(s.image_path).is_file():
            reason = f"image not found: {s.image_path or '(no image path)'}"
            if on_error == "raise":
                raise VislensError(f"sample {s.id}: {reason}")
            bad[i] = reason
    if not samples:
        return []
    model = _load_detector(weights)
    names = {int(k): str(v) for k, v in (class_names or model.names).items()}
    results: list[DetectionResult | None] = [None] * len(samples)
    todo = [i for i in range(len(samples)) if i not in bad]
    for i, reason in bad.items():
        results[i] = _skipped(samples[i], reason)
    for start in range(0, len(todo), int(batch)):
        chunk, images = [], []
        for i in todo[start:start + int(batch)]:
            try:
                images.append(_read_rgb(samples[i].image_path))
                chunk.append(i)
            except Exception as exc:  # PIL raises many types for bad files
                reason = f"cannot read image {samples[i].image_path}: {type(exc).__name__}: {exc}"
                if on_error == "raise":
                    raise VislensError(f"sample {samples[i].id}: {reason}") from exc
                results[i] = _skipped(samples[i], reason)
        if not images:
            continue
        preds = model.predict(images, conf=conf, device=device, batch=len(images),
                              verbose=False)
        for i, image, pred in zip(chunk, images, preds):
            xyxy, scores, classes = _raw_detections(pred)
            s = samples[i]
            results[i] = DetectionResult(
                s.id, s.image_path, tuple(image.size),  # type: ignore[arg-type]
                match_detections(s.objects, xyxy, scores, classes, names, conf))
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- capture files

_OBJECT_PATTERNS = (
    re.compile(r"where (?:is|are) the (.+?) in relation to (?:the )?(.+?)\s*\?", re.I),
    re.compile(r"where (?:is|are) the (.+?) in the (?:photo|image|picture)", re.I),
)


def objects_from_question(question: str) -> list[str]:
    """Object names of a WhatsUp-style question ("Where is the A in relation to the B?")."""
    for pat in _OBJECT_PATTERNS:
        m = pat.search(question)
        if m:
            return [g.strip() for g in m.groups() if g]
    return []


def capture_samples(cap: Any, *, need_boxes: bool = False) -> list[Sample]:
    """The capture's samples with their object names (and dataset boxes) restored.

    The dataset named in the capture's attrs is reloaded when its files are still there
    (this restores ``objects`` and ``boxes`` exactly); otherwise objects are parsed from the
    WhatsUp-style question text. Where that loses something, a one-line VislensError says
    why instead: ``need_boxes`` (the dataset's own boxes are wanted), or a question that
    names no objects. A dataset named by a relative path reloads only from the folder the
    capture was made in.
    """
    smp = cap.samples
    by_id: dict[str, Sample] = {}
    dataset, root = cap.attrs.get("dataset", ""), cap.attrs.get("data_root", "") or None
    problem = "it names no dataset"
    if dataset:
        from .data import load_dataset

        try:
            by_id = {s.id: s for s in load_dataset(dataset, root)}
            problem = ""
        except VislensError as exc:
            problem = f"its dataset {dataset} cannot be reloaded ({exc})"
    out = []
    for row in smp.itertuples(index=False):
        src = by_id.get(row.id)
        if src is None and (need_boxes or not objects_from_question(row.question)):
            why = problem or f"its dataset {dataset} has no sample {row.id} (changed since the capture?)"
            what = ("the dataset's own boxes" if need_boxes else
                    f"the object names of sample {row.id}, which its question does not give")
            raise VislensError(f"{cap.path}: need {what}, but {why}; run from the folder the "
                               "capture was made in, or restore the dataset's files")
        out.append(Sample(id=row.id, image_path=row.image_path, question=row.question,
                          options=list(row.options), answer=row.answer, relation=row.relation,
                          group=row.group, split=row.split,
                          objects=list(src.objects) if src and src.objects else objects_from_question(row.question),
                          boxes=list(src.boxes) if src else []))
    return out


def attach_boxes(path: str | Path, detector: str = "annotations", *, weights: str | Path | None = None,
                 conf: float = 0.25, batch: int = 16, device: str | None = None,
                 on_error: str = "skip") -> dict[str, int]:
    """``vislens boxes``: detect (or take) the question objects' boxes and store them with
    their analysis-grid masks in the capture's ``/boxes/`` (atomic rewrite of the file)."""
    from .store import lock_output, open_capture, replace_boxes

    if detector not in ("annotations", "yolo"):
        raise VislensError(f"--detector {detector!r}: choose annotations or yolo")
    if detector == "yolo":
        if weights is None:
            raise VislensError("--detector yolo needs --weights PATH (e.g. yolov8x.pt you downloaded)")
        _check_weights(weights)
    with open_capture(path) as cap:
        grid = int(np.asarray(cap.attrs["grid"]).ravel()[0])
        samples = capture_samples(cap, need_boxes=detector == "annotations")
        sizes = list(zip(cap.samples["width"], cap.samples["height"]))
        views = cap.views()  # what the model saw (the whole image in files without it)
    lock = lock_output(path)  # before detection: a second writer or read-only folder fails now
    try:
        if detector == "yolo":
            results = detect_boxes(samples, weights, conf=conf, batch=batch, device=device,
                                   on_error="raise" if on_error == "stop" else on_error)
        else:
            results = annotation_boxes(samples)
        masks = np.zeros((len(samples), grid, grid), dtype=np.float32)
        for i, res in enumerate(results):
            size = res.image_size or (int(sizes[i][0]), int(sizes[i][1]))
            if res.detections and size[0] > 0:
                masks[i] = box_mask(res.xyxy, size, grid, view=views[i])
        replace_boxes(path, masks, [r.detections for r in results], detector,
                      unmatched=[r.unmatched for r in results], lock=lock)
    finally:
        lock.release()
    n_found = sum(len(r.detections) for r in results)
    n_missing = sum(len(r.unmatched) for r in results)
    return {"samples": len(samples), "boxes": n_found, "unmatched": n_missing,
            "with_mask": int((masks.sum(axis=(1, 2)) > 0).sum())}
