"""A small capture of the model organism for the viewer tests, built once per session.

12 synthetic scenes (subset b: left/right/front/behind, with exact boxes, in the scene
style the organism was trained on), baseline and ScalingVis alpha=2: a few seconds on a CPU. Shared by test_view.py and test_view_browser.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py

_BUILT: dict[str, Path] = {}


def organism_capture(tmp_path_factory) -> Path:
    """Path of the (final) organism capture; built on the first call of the session."""
    if "capture" not in _BUILT:
        from vislens.capture import run_capture
        from vislens.organism.evaluation import training_style
        from vislens.paths import organism_path
        from vislens.synth import SceneStyle, generate_groups, write_scenes

        root = tmp_path_factory.mktemp("view-capture")
        style = SceneStyle.parse(training_style(organism_path()))
        data = write_scenes(generate_groups(3, "b", seed=2026, style=style), root / "scenes",
                            name="b.jsonl")
        summary = run_capture(model="organism", dataset=f"jsonl:{data}", out=root / "organism.h5",
                              conditions=["baseline", "scaling:alpha=2"], max_new_tokens=2,
                              matcher="first-word", device="cpu", batch_size=12, progress=False,
                              log=lambda m: None)
        assert summary.complete
        _BUILT["capture"] = summary.path
    return _BUILT["capture"]


def with_missing_image(capture: Path, out: Path, row: int = 0) -> Path:
    """A copy of ``capture`` whose sample ``row`` names an image file that does not exist."""
    shutil.copyfile(capture, out)
    with h5py.File(out, "r+") as f:
        f["samples/image_path"][row] = "no/such/image.png"
    return out
