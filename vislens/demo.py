"""``vislens demo``: the whole pipeline on the embedded model organism, on a laptop CPU.

Held-out synthetic scenes -> capture (baseline, ScalingVis smooth/sharpen, AdaptVis) into one
HDF5 file per subset -> evaluation tables -> per-layer AUROC reports -> the paper's figures ->
a ScalingVis/AdaptVis hyper-parameter sweep with VCD and DoLa baselines (Table 1) -> the
findings scorecard (the paper's claims F1-F10 on both captures).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

DEMO_SEED = 2026  # held-out scenes: the organism is trained on other seeds
DEMO_CONDITIONS = ("baseline", "scaling:alpha=0.5", "scaling:alpha=2",
                   "adaptvis:alpha1=0.5,alpha2=2,beta=0.6", "add:delta=-1", "add:delta=1")


def demo_model(model: str, out: Path, log: Callable[[str], None]) -> str:
    """The organism when it is there; otherwise a tiny random LLaVA (said loudly)."""
    from .paths import organism_path

    if model != "organism":
        return model
    if (organism_path() / "config.json").exists():
        return str(organism_path())
    from .models.tiny import build_tiny
    from .synth import object_names

    log("note: no trained organism in data/organism; using a tiny RANDOM LLaVA instead "
        "(attention is not meaningful)")
    return str(build_tiny("llava", out / "tiny-random-llava", words=object_names()))


def run_demo(out_dir: str | Path = "vislens-demo", groups: int = 12, model: str = "organism",
             batch_size: int = 8, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the demo pipeline; returns the paths it wrote, keyed by what they are."""
    from .capture import run_capture
    from .evaluate import evaluate_capture, to_markdown
    from .models import load_model
    from .organism.evaluation import training_style
    from .synth import SceneStyle, synthesize

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    model_path = demo_model(model, out, log)
    style = training_style(model_path)  # the scenes the organism was trained on (plain otherwise)
    scenes = synthesize(out / "scenes", 4 * groups, DEMO_SEED, style=SceneStyle.parse(style))
    log(f"[1/5] rendered {4 * groups} held-out scenes per subset (style {style}) into {scenes}")
    adapter = load_model(model_path, dtype="float32", device="auto")
    log(f"[2/5] capturing {len(DEMO_CONDITIONS)} conditions with {adapter.name} "
        f"({adapter.num_layers} layers x {adapter.num_heads} heads)")
    for subset in ("a", "b"):
        path = out / f"capture_{subset}.h5"
        for stale in (path, path.with_name(path.name + ".lock")):
            stale.unlink(missing_ok=True)  # the demo always starts afresh
        summary = run_capture(model=adapter, dataset=f"jsonl:{scenes / f'controlled_{subset}.jsonl'}",
                              out=path, conditions=DEMO_CONDITIONS, batch_size=batch_size,
                              max_new_tokens=4, matcher="first-word", progress=False,
                              command=f"vislens demo --groups {groups}", log=log)
        written[f"capture_{subset}"] = summary.path
        tables = evaluate_capture(summary.path, out / f"eval_{subset}", log=log)
        acc = tables["accuracy"]
        acc = acc[acc["matcher"] == "first-word"].drop(columns="matcher")
        log(f"\n### subset {subset} ({summary.n_total} questions, first-word matching)\n")
        log(to_markdown(acc))
        log("")
    from .figures import write_figures
    from .report import write_report

    for subset in ("a", "b"):
        rep = write_report(written[f"capture_{subset}"], out / f"report_{subset}", log=log)
        written[f"report_{subset}"] = rep
        log(f"[3/5] per-layer AUROC report: {rep}")
    figs = write_figures([written["capture_a"], written["capture_b"]], out / "figures",
                         log=lambda m: log("      " + m))  # Figs. 14/15 compare the subsets
    written["figures"] = out / "figures"
    log(f"[4/5] {len(figs)} figures in {out / 'figures'}")
    from .evaluate import to_markdown as _md
    from .sweep import run_sweep

    sweep = run_sweep(model=adapter, dataset=f"jsonl:{scenes / 'controlled_a.jsonl'}",
                      out=out / "sweep_a", baselines="vcd,dola", matcher="first-word",
                      max_new_tokens=4, batch_size=batch_size, progress=False, log=lambda m: None)
    written["sweep_a"] = out / "sweep_a"
    log(f"[5/5] sweep (alpha, beta chosen on the validation split) -> {out / 'sweep_a'}\n")
    log(_md(sweep.table1, floatfmt=".1f"))
    log("")
    from .findings import scorecard_text, write_findings

    found, card = write_findings([written["capture_a"], written["capture_b"]], out / "findings")
    written["findings"] = card
    log(f"findings scorecard of the organism ({card}):\n")
    log(scorecard_text(found))
    log("")
    log(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return written
