"""Where ScalingVis acts in the organism: alphas restricted to single layers (and to the
wired heads), scored on F8's confidence halves.

F8 reads two numbers: the gain of the strongest smoothing on the low-confidence half and of
the strongest sharpening on the high half, with the alpha applied in every layer. When F8
fails, the question is which layer's attention the alpha moves and whom that helps. This
captures the same held-out scenes as the scorecard under ScalingVis restricted to each
layer (and to the heads the init wires: layer 0's name heads, layer 1's object heads) and
tabulates every condition's paired gain per half (:func:`vislens.findings.confidence_half_gains`)
and how many of each half's errors some of these alphas fixes (:func:`vislens.findings.scaling_headroom`).
The conditions are fixed here, the same for every checkpoint; they are captured apart from
the scorecard, so its choices among conditions (F9, F10) never see the restricted ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import SCORECARD_GROUPS, SCORECARD_SEED, Log

__all__ = ["DIAGNOSIS_ALPHAS", "WIRED_HEADS", "diagnosis_conditions", "run_diagnosis"]

#: the scorecard's strongest smoothing and sharpening (the two alphas F8 reads)
DIAGNOSIS_ALPHAS: tuple[float, ...] = (0.5, 2.0)
#: heads the init wires (vislens.organism.build._wire_init): layer -> (heads, role)
WIRED_HEADS: dict[int, tuple[tuple[int, ...], str]] = {0: ((0, 1), "names"), 1: ((0, 1), "objects")}


def diagnosis_conditions(num_layers: int) -> tuple[str, ...]:
    """Baseline, then per alpha: all layers, each layer alone, each wired head group."""
    conds = ["baseline"]
    for a in DIAGNOSIS_ALPHAS:
        conds.append(f"scaling:alpha={a:g},name=scaling-{a:g}")
        conds += [f"scaling:alpha={a:g},layers={layer},name=scaling-{a:g}-L{layer}"
                  for layer in range(num_layers)]
        conds += [f"scaling:alpha={a:g},layers={layer},heads={'+'.join(map(str, heads))},"
                  f"name=scaling-{a:g}-L{layer}-{role}"
                  for layer, (heads, role) in WIRED_HEADS.items() if layer < num_layers]
    return tuple(conds)


def run_diagnosis(path: str | Path, out_dir: str | Path, *, n_groups: int = SCORECARD_GROUPS,
                  seed: int = SCORECARD_SEED, style: str = "plain", batch_size: int = 16,
                  n_boot: int = 1000, log: Log | None = print, adapter: Any = None,
                  force: bool = False) -> "pd.DataFrame":
    """Capture :func:`diagnosis_conditions` on the scorecard's held-out scenes (same ``seed``,
    ``n_groups`` and ``style`` give the same scenes and baseline) into ``out_dir`` and write
    the per-half gains to ``out_dir/halves.csv`` and ``halves.md``; returns that table, with
    the headroom per half (errors some alpha fixes, ``out_dir/headroom.csv``, also in
    ``halves.md``) as records in ``table.attrs["headroom"]``."""
    from ..findings import (confidence_half_gains, halves_markdown, headroom_markdown,
                            load_evidence, scaling_headroom)
    from ..io import prepare_output_dir
    from .scorecard import capture_heldout, load_organism

    prepare_output_dir(out_dir, force=force)  # a foreign folder is refused before loading
    adapter = adapter if adapter is not None else load_organism(path)
    captures = capture_heldout(path, out_dir, diagnosis_conditions(adapter.num_layers),
                               n_groups=n_groups, seed=seed, style=style, batch_size=batch_size,
                               log=log, adapter=adapter, force=force,
                               command="vislens organism eval --diagnose")
    evidence = [load_evidence(p) for p in captures]
    table = confidence_half_gains(evidence, n_boot=n_boot)
    head = scaling_headroom(evidence)
    out = Path(out_dir)
    table.to_csv(out / "halves.csv", index=False)
    head.to_csv(out / "headroom.csv", index=False)
    (out / "halves.md").write_text(halves_markdown(table) + "\n\nErrors of each half that some "
                                   "of these alphas fixes (a ceiling for any per-sample choice "
                                   "of alpha):\n\n" + headroom_markdown(head) + "\n",
                                   encoding="utf-8")
    table.attrs["headroom"] = json.loads(head.to_json(orient="records"))
    if log:
        log(f"ScalingVis by layer and confidence half: {out / 'halves.md'}")
    return table
