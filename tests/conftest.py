"""Shared fixtures: tiny models of every supported architecture, built offline once."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Build (once per session) and return a function arch -> saved model directory."""
    from vislens.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny(arch, root / arch, seed=1)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dir):
    """arch -> adapter loaded through ``load_model(path)`` (cached per session)."""
    from vislens.models import load_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(tiny_dir(arch), dtype="float32", device="cpu")
        return cache[arch]

    return get


def random_image(seed: int, size=(60, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
