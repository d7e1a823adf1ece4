"""Notebooks: committed without outputs, paired with their py:percent copies, and runnable.

Each notebook runs top to bottom in a fresh kernel of this interpreter on a small synthetic
capture (``VISLENS_CAPTURE``), writing its figures into a temporary ``VISLENS_FIGURES_DIR``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

try:  # tests/ is on sys.path with pytest's default import mode
    from test_plots import L, make_capture
except ImportError:  # --import-mode=importlib
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_vislens_test_plots",
                                                   Path(__file__).with_name("test_plots.py"))
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    L, make_capture = _mod.L, _mod.make_capture

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_attention_share", "02_focus_and_auroc", "03_scaling_and_confidence",
         "04_before_after_intervention"]
# the paper's layers at the synthetic model's depth, computed here by hand: round(l * L / 32)
# for the paper's layer 17 (Figs. 5, 9, 10, 14) and 14 (Fig. 26) of 32
LAYER17, LAYER14 = round(17 * L / 32), round(14 * L / 32)
assert (L, LAYER17, LAYER14) == (5, 3, 2)
# figures each notebook must write on the synthetic capture (every figure is supported there)
EXPECTED = {
    "01_attention_share": ["fig03_attention_share.png", "fig04_add_constant_accuracy.png"],
    "02_focus_and_auroc": [f"fig05_heatmaps_layer{LAYER17}.png", "fig06_overlap_roc.png",
                           "fig07_variance_and_auroc.png", f"fig14_entropy_skewness_layer{LAYER17}.png"],
    "03_scaling_and_confidence": ["fig08_scaling_sweep.png", "fig15_confidence_by_relation.png"],
    "04_before_after_intervention": [f"fig09_smoothing_layer{LAYER17}.png",
                                     f"fig10_sharpening_layer{LAYER17}.png",
                                     f"fig26_log_attention_layer{LAYER14}.png"],
}


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_a_paired_script():
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    scripts = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
    assert ipynbs == scripts == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync_and_without_outputs(name):
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert _cells(ipynb) == _cells(script), f"{name}.ipynb and {name}.py differ: run jupytext --sync"
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    raw = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in raw.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb has outputs"
    params = [c for c in raw.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "CAPTURE = None" in params[0].source


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return make_capture(tmp_path_factory.mktemp("nb") / "capture.h5", n=24)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, capture, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("VISLENS_CAPTURE", str(capture))
    monkeypatch.setenv("VISLENS_FIGURES_DIR", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    # the kernel is this interpreter (jupyter_client maps the spec's "python" to sys.executable)
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(EXPECTED[name])
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "skipped" not in text
    if name in ("02_focus_and_auroc", "04_before_after_intervention"):  # says which layers
        assert (f"the paper's layers at this model's depth ({L} layers): Figs. 5, 9, 10, 14 layer "
                f"{LAYER17}") in text
    for p in out.iterdir():
        assert p.stat().st_size > 5000


def test_notebook_skips_unsupported_figures(tmp_path, monkeypatch):
    """On a capture without add conditions, notebook 01 notes the skip and still finishes."""
    cap = make_capture(tmp_path / "small.h5", n=8, conditions=("baseline", "scaling:2"))
    out = tmp_path / "figures"
    monkeypatch.setenv("VISLENS_CAPTURE", str(cap))
    monkeypatch.setenv("VISLENS_FIGURES_DIR", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / "01_attention_share.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "skipped fig04_add_constant_accuracy: " in text and "no 'add' conditions" in text
    assert sorted(p.name for p in out.iterdir()) == ["fig03_attention_share.png"]
