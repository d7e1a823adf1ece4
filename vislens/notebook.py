"""What the notebooks in ``notebooks/`` share: which capture to read, where figures go.

``VISLENS_CAPTURE`` / ``VISLENS_FIGURES_DIR`` point the notebooks elsewhere; without them
they read the demo's capture (created on first use) and save into the repository's
``figures/``. :func:`attempt` draws one figure and, when the capture cannot support it,
says why in one line instead of stopping the notebook.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import VislensError
from .figures import save_figure
from .paths import repo_root

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .store import Capture

__all__ = ["DEMO_CAPTURE", "attempt", "figure_layers", "notebook_session", "resolve_capture",
           "resolve_figures_dir"]

#: the organism demo's capture, relative to the repository root (``make demo`` writes it)
DEMO_CAPTURE = Path("vislens-demo") / "capture_a.h5"


def resolve_capture(path: str | os.PathLike | None = None, *, create: bool = True,
                    log: Callable[[str], None] = print) -> Path:
    """The capture a notebook reads: ``path``, else ``$VISLENS_CAPTURE``, else the demo's.

    The demo capture (``vislens-demo/capture_a.h5`` at the repository root) is created
    with :func:`vislens.demo.run_demo` when missing (and ``create``).
    """
    if path is None:
        path = os.environ.get("VISLENS_CAPTURE") or None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise VislensError(f"{p}: no such capture file")
        return p
    p = repo_root() / DEMO_CAPTURE
    if not p.is_file():
        if not create:
            raise VislensError(f"{p}: no demo capture (run `make demo`)")
        from .demo import run_demo

        log(f"{p} is missing: running the demo to create it (a few minutes on a CPU)")
        written = run_demo(out_dir=p.parent, log=log)
        p = Path(written.get("capture_a", p))
    return p


def resolve_figures_dir(path: str | os.PathLike | None = None) -> Path:
    """Where notebooks save figures: ``path``, else ``$VISLENS_FIGURES_DIR``, else ``figures/``."""
    if path is None:
        path = os.environ.get("VISLENS_FIGURES_DIR") or (repo_root() / "figures")
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def notebook_session(capture: str | os.PathLike | None = None,
                     figures_dir: str | os.PathLike | None = None
                     ) -> tuple[Path, Path, "Capture"]:
    """The notebooks' shared set-up: resolve the capture and figure folder, open the capture.

    Returns ``(capture_path, figures_dir, Capture)`` and prints what it opened.
    """
    from .store import open_capture

    path = resolve_capture(capture)
    out = resolve_figures_dir(figures_dir)
    cap = open_capture(path)
    print(cap)
    print("figures go to", out)
    return path, out, cap


def attempt(draw: Callable[[], "Figure"], out_dir: str | os.PathLike | None = None,
            name: str | None = None, fmt: str = "png", log: Callable[[str], None] = print
            ) -> "Figure | None":
    """``draw()`` and save the figure as ``out_dir/name.fmt``; on VislensError log why and return None.

    A figure the capture cannot support is skipped with a one-line note instead of stopping
    the notebook.
    """
    try:
        fig = draw()
    except VislensError as exc:
        log(f"skipped {name or 'figure'}: {str(exc).splitlines()[0]}")
        return None
    if out_dir is not None and name:
        log(f"saved {save_figure(fig, out_dir, name, fmt)}")
    return fig


def figure_layers(cap: "Capture", layer: int | None = None,
                  log: Callable[[str], None] = print) -> dict[int, list[int]]:
    """The layers each per-layer paper figure is drawn at, ``{figure: [layer, ...]}``.

    ``layer`` (the notebooks' ``LAYER``) draws them all there; ``None`` takes the paper's
    layers at this model's relative depth (:data:`vislens.analysis.PAPER_LAYERS`: 17 of 32
    for Figures 5, 9, 10 and 14, 17 and 18 for Figure 6, 14 for Figure 26), as
    ``vislens figures`` does. Not the best layer on the same data, which would flatter the
    AUROCs. Logs which layers were used.
    """
    from .analysis import PAPER_LAYERS
    from .figures import describe_paper_layers, paper_figure_layers
    from .plots import check_layer

    n = int(cap.attrs["num_layers"])
    if layer is not None:
        fixed = check_layer(layer, n, cap.path)
        log(f"layer {fixed} (LAYER) for every per-layer figure")
        return {k: [fixed] for k in PAPER_LAYERS}
    log(describe_paper_layers(n))
    return paper_figure_layers(n)
