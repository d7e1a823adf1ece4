"""The organism's model card: ``README.md`` from ``model_card.md`` (a template shipped with
the package) and ``organism.json`` with the same numbers for the tests."""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping, Sequence

from .config import CARD_FILE, DEFAULT_BATCH, DEFAULT_LR, EVAL_SEED, relation_weights

__all__ = ["write_model_card", "card_values", "scorecard_table"]

TEMPLATE = "model_card.md"


def _md_table(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _command(stats: Mapping[str, Any], out: str = "data/organism") -> str:
    cmd = f"vislens organism train --out {out} --seed {stats['seed']} --steps {stats['steps_planned']}"
    if stats.get("small"):
        cmd += " --small"
    if stats.get("style", "plain") != "plain":
        cmd += f" --style {stats['style']}"
    weights = stats.get("relation_weights")
    if weights and weights != relation_weights():
        cmd += f" --familiar-weight {weights['a']['left'] / weights['a']['on']:g}"
    if stats.get("batch_size", DEFAULT_BATCH) != DEFAULT_BATCH:
        cmd += f" --batch-size {stats['batch_size']}"
    if stats.get("lr", DEFAULT_LR) != DEFAULT_LR:
        cmd += f" --lr {stats['lr']:g}"
    if stats.get("stopped_early"):  # a time limit cannot be repeated exactly
        cmd += (f"\n# this checkpoint stopped after {stats['steps']} of {stats['steps_planned']} "
                f"steps ({stats['stopped_early']}); the command runs all {stats['steps_planned']}")
    return cmd


def _familiarity_summary(eval_df) -> str:
    """One sentence: accuracy and confidence on the familiar vs the rare relations."""
    rows = eval_df[eval_df["relation"] != "all"]
    fam = rows["relation"].isin(["left", "right"])

    def mean(sel, col):
        return float((rows.loc[sel, col] * rows.loc[sel, "n"]).sum() / rows.loc[sel, "n"].sum())

    return (f"Familiar relations (left/right): accuracy {mean(fam, 'accuracy'):.3f}, confidence "
            f"{mean(fam, 'confidence'):.3f}; rare ones (on/under/front/behind): accuracy "
            f"{mean(~fam, 'accuracy'):.3f}, confidence {mean(~fam, 'confidence'):.3f}.")


def _fmt(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def scorecard_table(findings: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of a findings scorecard (``findings.json`` rows)."""
    lines = ["| id | verdict | value | 95% interval | n | claim |", "|---|---|---|---|---|---|"]
    for f in findings:
        ci = "—" if f.get("ci_low") is None else f"[{_fmt(f['ci_low'])}, {_fmt(f['ci_high'])}]"
        lines.append(f"| {f['id']} | {f['verdict']} | {_fmt(f.get('value'))} | {ci} | {f['n']} | "
                     f"{f['claim']} |")
    return "\n".join(lines)


def _scorecard_section(sc: Mapping[str, Any] | None) -> str:
    """The card's scorecard section from ``organism.json``'s ``scorecard`` entry."""
    if not sc:
        return ("Not measured for this checkpoint (run `vislens organism eval --scorecard DIR "
                "--write-card`).")
    found = sc["findings"]
    n_rep = sum(f["verdict"] == "reproduced" for f in found)
    out = [f"`vislens findings` on fresh balanced groups (`vislens synth`, {sc['n_groups']} groups "
           f"of 4 per subset = {4 * sc['n_groups']} scenes per subset, seed {sc['seed']}, style "
           f"`{sc['style']}`; this seed is used by no training or tuning run), conditions "
           f"{', '.join('`' + c + '`' for c in sc['conditions'])}; AdaptVis/ScalingVis parameters "
           f"are chosen on the validation split by the scorecard. **{n_rep} of {len(found)} "
           f"findings reproduced.**", "", scorecard_table(found), "",
           "Details (the scorecard's own words):", ""]
    out += [f"- **{f['id']}** ({f['verdict']}): {f['why']}" for f in found]
    control = sc.get("control")
    if control:
        n_c = sum(f["verdict"] == "reproduced" for f in control)
        out += ["", "### Control: the same architecture with the init prior, untrained", "",
                f"The same scenes and conditions on `build_organism(seed={sc.get('control_seed', 0)})` "
                f"(the wired init of the section above, no training step): **{n_c} of "
                f"{len(control)} reproduced**. Findings reproduced here too are not evidence of "
                "training.", "", scorecard_table(control)]
    if sc.get("notes"):
        out += ["", sc["notes"]]
    return "\n".join(out)


def _diagnosis_section(dg: Mapping[str, Any] | None) -> str:
    """The card's "where ScalingVis acts" section from ``organism.json``'s ``diagnosis``."""
    if not dg:
        return ("Not measured for this checkpoint (run `vislens organism eval --diagnose DIR "
                "--write-card`).")
    import pandas as pd

    from ..findings import halves_markdown

    table = pd.DataFrame(dg["rows"]).astype({"ci_low": float, "ci_high": float, "gain_pp": float})
    return "\n".join([
        f"The scorecard's scenes (seed {dg['seed']}, {dg['n_groups']} groups per subset, style "
        f"`{dg['style']}`) under ScalingVis at the scorecard's strongest smoothing and sharpening, "
        "in all layers (what F8 reads), in one layer at a time, and in the heads the init wires "
        "(layer 0's name heads, layer 1's object heads). Gains are paired against the baseline "
        "on F8's halves (baseline confidence below / at or above its median per subset), in pp, "
        "with bootstrap intervals; fixed / broken count the answers each condition turns right / "
        "wrong. Re-run: `vislens organism eval --diagnose DIR`.", "",
        halves_markdown(table), *_headroom_lines(dg.get("headroom"))])


def _headroom_lines(rows: Any) -> list[str]:
    """The diagnosis's headroom table (absent in cards written before it existed)."""
    if not rows:
        return []
    import pandas as pd

    from ..findings import headroom_markdown

    return ["", "How many of each half's baseline errors at least one of these alphas fixes "
            "(a ceiling for any per-sample choice among them, such as AdaptVis with two of "
            "these alphas; "
            "`vislens.findings.scaling_headroom`):", "", headroom_markdown(pd.DataFrame(rows))]


def card_values(path: Path, stats: Mapping[str, Any], eval_df,
                info: Mapping[str, Any], scorecard: Mapping[str, Any] | None = None,
                diagnosis: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every ``${name}`` of the template, formatted."""
    arch, params = stats["architecture"], stats["parameters"]
    weights = stats["relation_weights"]
    grid = arch["image_size"] // arch["patch"]
    by_layer = eval_df.attrs.get("box_attention_by_layer", [])
    ratio_by_layer = eval_df.attrs.get("box_ratio_by_layer", [])
    rows = "".join(f"| {i} | {a:.3f} | {r:.2f} |\n"
                   for i, (a, r) in enumerate(zip(by_layer, ratio_by_layer)))
    size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2 ** 20
    return {
        "vision_hidden": arch["vision_hidden"], "vision_layers": arch["vision_layers"],
        "vision_heads": arch["vision_heads"], "image_size": arch["image_size"],
        "patch": arch["patch"], "grid": grid, "n_image_tokens": grid * grid,
        "hidden": arch["hidden"], "layers": arch["layers"], "heads": arch["heads"],
        "head_dim": arch["hidden"] // arch["heads"], "mlp": 2 * arch["hidden"],
        "vocab_size": stats.get("vocab_size", "?"),
        "params_total": f"{params['total']:,}", "params_vision": f"{params['vision_tower']:,}",
        "params_projector": f"{params['projector']:,}",
        "params_language": f"{params['language_model'] + params['lm_head']:,}",
        "size_mb": f"{size_mb:.1f}",
        "n_scenes": f"{stats['n_scenes']:,}", "seed": stats["seed"],
        "train_image_size": stats["image_size"], "weights_a": weights["a"], "weights_b": weights["b"],
        "weight_decay": stats["weight_decay"], "lr": f"{stats['lr']:g}",
        "projector_lr_mult": f"{stats['projector_lr_mult']:g}",
        "batch_size": stats["batch_size"], "steps": stats["steps"],
        "train_minutes": f"{stats['train_seconds'] / 60:.1f}", "threads": stats["threads"],
        "seconds_per_step": f"{stats['seconds_per_step']:.2f}", "torch": stats["torch"],
        "final_loss": f"{stats['final_loss']:.4f}",
        "final_answer_accuracy": f"{stats.get('final_answer_accuracy', float('nan')):.3f}",
        "command": _command(stats),
        "n_groups": info.get("n_groups", "?"), "eval_seed": info.get("seed", EVAL_SEED),
        "eval_table": _md_table(eval_df), "familiarity": _familiarity_summary(eval_df),
        "layer_rows": rows, "style": stats.get("style", "plain"),
        "scorecard": _scorecard_section(scorecard),
        "diagnosis": _diagnosis_section(diagnosis),
    }


def write_model_card(path: str | Path, stats: Mapping[str, Any], eval_df,
                     eval_info: Mapping[str, Any] | None = None,
                     scorecard: Mapping[str, Any] | None = None,
                     diagnosis: Mapping[str, Any] | None = None) -> Path:
    """Write ``path/README.md`` (architecture, data, command, held-out results) and
    ``path/organism.json`` (the same numbers, machine-readable; read by the tests).

    ``scorecard``: the held-out findings scorecard (``n_groups``, ``seed``, ``style``,
    ``conditions``, ``findings`` as in ``findings.json``, optional ``control``: the untrained
    prior's findings, and ``notes``), stored under ``organism.json["scorecard"]``;
    ``diagnosis``: ScalingVis by layer and confidence half (``eval --diagnose``), stored under
    ``organism.json["diagnosis"]``."""
    path = Path(path)
    info = dict(eval_info or {})
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    card = path / CARD_FILE
    values = {k: str(v) for k, v in card_values(path, stats, eval_df, info, scorecard,
                                                      diagnosis).items()}
    card.write_text(Template(template).substitute(values), encoding="utf-8")
    meta = {k: v for k, v in stats.items() if k != "losses"}
    meta["eval"] = {**info, "table": json.loads(eval_df.to_json(orient="records")),
                    "box_attention_by_layer": eval_df.attrs.get("box_attention_by_layer", []),
                    "box_ratio_by_layer": eval_df.attrs.get("box_ratio_by_layer", [])}
    if scorecard:
        meta["scorecard"] = dict(scorecard)
    if diagnosis:
        meta["diagnosis"] = dict(diagnosis)
    (path / "organism.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return card
