"""Model adapters: ``load_model`` picks the adapter from the checkpoint's config.

Supported: LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``, 13b), LLaVA-1.6 / NeXT
(``llava-hf/llava-v1.6-*``), Qwen2-VL and Qwen2.5-VL. No ``trust_remote_code``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import VislensError
from ..paths import organism_path
from . import llava, llava_next, qwen2_vl  # noqa: F401  (each registers its family)
from .base import ADAPTER_REGISTRY, AdapterEntry, PreparedBatch, VLMAdapter, register_adapter
from .layout import ImageLayout, area_projection, grid_rects

__all__ = ["load_model", "VLMAdapter", "PreparedBatch", "ImageLayout", "area_projection",
           "grid_rects", "ADAPTERS", "ADAPTER_REGISTRY", "AdapterEntry", "register_adapter",
           "resolve_dtype", "resolve_device", "organism_path", "model_dims"]

#: the supported ``model_type`` names (derived from :data:`ADAPTER_REGISTRY`)
ADAPTERS: tuple[str, ...] = ADAPTER_REGISTRY.names()
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def resolve_device(device: str | int | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; an int N -> ``"cuda:N"``.

    Anything else must be a torch device this machine has (or ``"balanced"``): a name torch
    cannot parse, a device type without a device here, or ``"meta"`` (no weights) is refused
    in one line before any weights load.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    if device == "balanced":
        kind, index = "cuda", ""
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise VislensError(f"--device {device!r}: not a device; use auto, cpu, cuda, cuda:N "
                               "or balanced") from None
        kind, index = parsed.type, "" if parsed.index is None else str(parsed.index)
    if kind == "meta":
        raise VislensError(f"--device {device!r}: a meta device holds no weights; use auto, cpu, "
                           "cuda, cuda:N or balanced")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise VislensError(f"--device {device}: no CUDA device is available on this machine "
                               "(use --device cpu or auto)")
        if index and int(index) >= n:
            raise VislensError(f"--device {device}: this machine has {n} CUDA device(s), "
                               f"cuda:0-cuda:{n - 1}")
    elif kind != "cpu":
        backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise VislensError(f"--device {device!r}: no {kind} device is available on this "
                               "machine (use --device cpu or auto)")
    return str(device)


def resolve_dtype(dtype: Any, device: str):
    """``"auto"`` -> bfloat16 on CUDA (one GPU or ``"balanced"``: what 7B users run), float32
    on CPU."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") or device == "balanced" \
            else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise VislensError(f"dtype {dtype}: weights load in a floating dtype; choose one of "
                               "auto, float32, bfloat16, float16")
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise VislensError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]


def _hub_offline() -> bool:
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return bool(is_offline_mode())


def _check_hub_id(name: str, revision: str | None, local_files_only: bool | None) -> bool | None:
    """Fail fast on a hub id that cannot load; returns the ``local_files_only`` to load with.

    A model in the local hub cache loads as usual (from the cache alone when offline or when
    the hub does not answer). Otherwise offline mode (``HF_HUB_OFFLINE=1`` or
    ``local_files_only``) is an error at once, and online one metadata request tells an
    unknown id or an unreachable hub apart before transformers' retried downloads start.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub import errors as hub_errors

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except ValueError as exc:  # not a valid repo id
        raise VislensError(f"{name}: not a model directory and not a valid hub id ({exc})") from None
    offline = bool(local_files_only) or _hub_offline()
    if offline:
        if not cached:
            why = "local_files_only" if local_files_only else "HF_HUB_OFFLINE is set"
            raise VislensError(f"{name}: no such model directory, and not in the local hub cache "
                               f"({why}, so nothing is downloaded)")
        return True
    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except hub_errors.GatedRepoError:
        raise VislensError(f"{name}: gated model on the hub: accept its licence there and log in "
                           f"(`hf auth login`)") from None
    except hub_errors.RevisionNotFoundError:
        raise VislensError(f"{name}: revision {revision!r} not found on the hub") from None
    except hub_errors.RepositoryNotFoundError:
        raise VislensError(f"{name}: no such model on the hub (nor a local directory; private "
                           f"models need `hf auth login`)") from None
    except Exception as exc:  # no network, DNS, timeout, HTTP 5xx: httpx/requests types vary
        if cached:
            return True  # the hub does not answer: use the cached copy without retries
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VislensError(f"{name}: cannot reach the hub ({detail}) and the model is not in "
                           f"the local cache; download it first or give a local directory"
                           ) from None
    return local_files_only


def _pickle_detail(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names the offending global."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return next((l for l in lines if "GLOBAL" in l), lines[0] if lines else type(exc).__name__)


def _adapter_entry(name: str, config: Any) -> AdapterEntry:
    """The registered family of ``config``; an unsupported architecture is one line."""
    import transformers

    model_type = getattr(config, "model_type", "")
    archs = list(getattr(config, "architectures", None) or [])
    if model_type not in ADAPTER_REGISTRY:
        raise VislensError(f"{name}: unsupported architecture {(archs or [model_type])[0]!r}; "
                           f"vislens supports {', '.join(ADAPTER_REGISTRY.names())}")
    entry = ADAPTER_REGISTRY.get(model_type)
    if archs and not any(hasattr(transformers, a) for a in archs):
        # e.g. liuhaotian/llava-v1.5-*: model_type "llava", weights in another layout
        raise VislensError(f"{name}: unsupported architecture {archs[0]!r} (not a transformers "
                           f"class: a checkpoint in its original repository's format?); vislens "
                           f"loads {entry.model_class} checkpoints such as the llava-hf conversions")
    return entry


def _check_loading_info(name: str, class_name: str, info: dict[str, Any]) -> None:
    """Refuse weights that do not fit the model: transformers fills missing ones with random
    values and only logs it, so a checkpoint in another layout would run as a random model."""
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    mismatched = [str(k[0] if isinstance(k, (tuple, list)) else k)
                  for k in info.get("mismatched_keys") or ()]
    if missing:
        raise VislensError(f"{name}: the checkpoint does not fit {class_name}: {len(missing)} "
                           f"weight(s) missing (e.g. {missing[0]}) would be random")
    if mismatched:
        raise VislensError(f"{name}: the checkpoint does not fit {class_name}: {len(mismatched)} "
                           f"weight(s) of another shape (e.g. {mismatched[0]})")


def _locate(name_or_path: str | Path) -> tuple[str, bool]:
    """``(name, is_local_dir)``: ``"organism"`` -> its folder; a local folder must hold a
    config and weights; a path-like name that does not exist is refused."""
    name = str(name_or_path)
    if name == "organism":  # the embedded default: vislens's own tiny trained LLaVA
        name = str(organism_path())
    path = Path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise VislensError(f"{name}: not a model directory (no config.json)")
        if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
            raise VislensError(f"{name}: model directory has no weights (*.safetensors or *.bin)")
        return name, True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise VislensError(f"{name}: no such model directory")
    return name, False


def model_dims(name_or_path: str | Path, *, revision: str | None = None) -> tuple[int, int] | None:
    """``(num_layers, num_heads)`` of a model's language model, read from its config only.

    No weights are loaded and the hub is never contacted: ``"organism"`` and local folders
    read their ``config.json``; a hub id reads its cached config. A hub id whose config is
    not cached gives ``None`` when the hub may be reached (the caller checks after loading)
    and a one-line error when offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``).
    An unsupported architecture is refused here too.
    """
    from transformers import AutoConfig

    name, local = _locate(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, local_files_only=True,
                                            trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if local:
            raise VislensError(f"{name}: cannot read the model config "
                               f"({str(exc).splitlines()[0]})") from None
        if _hub_offline():
            raise VislensError(f"{name}: not a local model directory and not in the hub cache "
                               "(the hub is offline: HF_HUB_OFFLINE); download it first or "
                               "pass a local directory") from None
        return None
    _adapter_entry(name, config)
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def load_model(name_or_path: str | Path, dtype: Any = "auto", device: str | None = "auto", *,
               revision: str | None = None, local_files_only: bool | None = None) -> VLMAdapter:
    """Load a supported VLM checkpoint (hub id or local directory) and wrap it in its adapter.

    The language model's attention is switched to vislens's registered ``"vislens"``
    function (plain SDPA unless a :class:`~vislens.steering.Steerer` is armed); the vision
    tower keeps SDPA. ``device`` may be ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``
    (``device_map="auto"`` across GPUs is used for ``"balanced"``).
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from ..steering import register_attention

    name, local = _locate(name_or_path)
    if local and revision is not None:
        raise VislensError(f"{name}: revision {revision!r} given, but a local directory has no "
                           "revisions (it loads as it is); drop revision or pass a hub id")
    if not local:
        local_files_only = _check_hub_id(name, revision, local_files_only)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False,
                                            local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise VislensError(f"{name}: cannot read the model config ({str(exc).splitlines()[0]})") from exc
    adapter_cls, class_name = _adapter_entry(name, config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_cls = getattr(transformers, class_name)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, revision=revision, attn_implementation="sdpa",
                                  trust_remote_code=False)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    # straight onto the device: a 7B model never sits in host memory as a whole first
    kwargs["device_map"] = "auto" if device == "balanced" else {"": str(device)}
    try:
        model, info = model_cls.from_pretrained(name, output_loading_info=True,
                                                ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError as exc:  # transformers reads *.bin with weights_only=True
        raise VislensError(f"{name}: refusing to load the weights: a pickled *.bin file holds "
                           f"more than tensors ({_pickle_detail(exc)}); use *.safetensors "
                           f"weights from a source you trust") from None
    _check_loading_info(name, class_name, info)
    if device != "balanced":  # weights are there already; this places any buffer the
        model = model.to(device)  # model made outside the device map (a no-op otherwise)
    model.eval()
    model.set_attn_implementation({"text_config": register_attention()})
    try:
        processor = AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=False,
                                                  local_files_only=local_files_only)
    except (OSError, ValueError) as exc:  # custom processor code (never run), missing files, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VislensError(f"{name}: cannot load the processor ({detail})") from None
    return adapter_cls(model, processor, name, revision=revision or getattr(config, "_commit_hash", None))
