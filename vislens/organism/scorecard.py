"""The organism's findings scorecard on held-out scenes: capture, then ``vislens findings``.

The conditions are fixed here, before any organism is looked at, and are the same for every
checkpoint (the untrained-prior control included): the baseline, ScalingVis at the paper's
smoothing/sharpening range, an AdaptVis grid (its parameters are chosen on the validation
split by the scorecard, F9), the additive shift (F2), VCD and DoLa (F10). Scenes are fresh
balanced groups (:func:`vislens.synth.synthesize`) of a seed no training run uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import VislensError
from .config import SCORECARD_GROUPS, SCORECARD_SEED, Log

__all__ = ["SCORECARD_CONDITIONS", "capture_heldout", "load_organism", "run_scorecard"]

#: the captured conditions (never tuned to an organism)
SCORECARD_CONDITIONS: tuple[str, ...] = (
    "baseline",
    "scaling:alpha=0.5", "scaling:alpha=0.8", "scaling:alpha=1.2", "scaling:alpha=2",
    *(f"adaptvis:alpha1={a1},alpha2={a2},beta={b},name=adaptvis-{a1}-{a2}-{b}"
      for a1, a2 in ((0.5, 2), (0.8, 1.2)) for b in (0.5, 0.7, 0.9)),
    "add:delta=1",
    "vcd", "dola",
)


def load_organism(path: str | Path) -> Any:
    """The organism at ``path`` as a vislens adapter (float32, best device); a folder without
    ``config.json`` is refused in one line."""
    from ..models import load_model

    if not Path(path, "config.json").exists():
        raise VislensError(f"{path}: no model organism there (no config.json)")
    return load_model(str(path), dtype="float32", device="auto")


def capture_heldout(path: str | Path, out_dir: str | Path, conditions: Sequence[str], *,
                    n_groups: int = SCORECARD_GROUPS, seed: int = SCORECARD_SEED,
                    style: str = "plain", batch_size: int = 16, log: Log | None = print,
                    adapter: Any = None, force: bool = False, command: str = "vislens organism eval"
                    ) -> list[Path]:
    """Render ``4 * n_groups`` balanced held-out scenes per subset (``seed``, ``style``) into
    ``out_dir/scenes`` and capture ``conditions`` on both subsets (both splits) with the
    organism at ``path`` (or ``adapter``); returns ``[capture_a.h5, capture_b.h5]``.
    ``out_dir`` follows vislens's output rule (a folder vislens did not create is refused
    unless ``force``); the captures in it are replaced."""
    from ..capture import run_capture
    from ..io import prepare_output_dir
    from ..synth import SceneStyle, synthesize

    say = log or (lambda msg: None)
    out = prepare_output_dir(out_dir, force=force)
    scenes = synthesize(out / "scenes", 4 * n_groups, seed, style=SceneStyle.parse(style))
    adapter = adapter if adapter is not None else load_organism(path)
    captures = []
    for subset in ("a", "b"):
        cap = out / f"capture_{subset}.h5"
        for stale in (cap, cap.with_name(cap.name + ".lock")):
            stale.unlink(missing_ok=True)
        summary = run_capture(model=adapter, dataset=f"jsonl:{scenes / f'controlled_{subset}.jsonl'}",
                              out=cap, conditions=tuple(conditions), batch_size=batch_size,
                              max_new_tokens=3, matcher="first-word", split="all",
                              progress=False, log=say,
                              command=f"{command} --scorecard-groups {n_groups} "
                                      f"--scorecard-seed {seed} --style {style}")
        captures.append(Path(summary.path))
    return captures


def run_scorecard(path: str | Path, out_dir: str | Path, *, n_groups: int = SCORECARD_GROUPS,
                  seed: int = SCORECARD_SEED, style: str = "plain",
                  conditions: tuple[str, ...] | None = None,
                  batch_size: int = 16, n_boot: int = 1000, log: Log | None = print,
                  adapter: Any = None, force: bool = False) -> list[Any]:
    """Capture ``conditions`` (default :data:`SCORECARD_CONDITIONS`) on ``4 * n_groups``
    held-out scenes per subset (:func:`capture_heldout`) with the organism at ``path`` and
    write the findings scorecard to ``out_dir/findings``. ``style``: the scenes'
    :class:`vislens.synth.SceneStyle` (``--style`` syntax).

    Returns the findings (:class:`vislens.findings.Finding` list). The captures stay in
    ``out_dir`` (``capture_a.h5``, ``capture_b.h5``) for ``vislens report``/``figures``.
    """
    from ..findings import write_findings

    conditions = SCORECARD_CONDITIONS if conditions is None else tuple(conditions)
    say = log or (lambda msg: None)
    captures = capture_heldout(path, out_dir, conditions, n_groups=n_groups, seed=seed,
                               style=style, batch_size=batch_size, log=log, adapter=adapter,
                               force=force)
    found, card = write_findings(captures, Path(out_dir) / "findings", n_boot=n_boot)
    say(f"findings scorecard: {card}")
    return found
