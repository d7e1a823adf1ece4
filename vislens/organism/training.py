"""Training the organism: seeded scenes, teacher forcing on the answer, a WSD schedule."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from ..errors import VislensError
from .build import build_organism, count_parameters, save
from .config import (DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_STYLE, ORGANISM,
                     RELATION_WEIGHTS, SMALL, TRAIN_FILE, Log, prompt)

__all__ = ["train_organism"]


def _training_scenes(n: int, seed: int, weights: Mapping[str, Mapping[str, float]], size: int,
                     style=None):
    """``n`` training scenes, half per subset (i.i.d., relation drawn with ``weights``,
    distractors/clutter per ``style``, a :class:`vislens.synth.SceneStyle`)."""
    from ..synth import PLAIN, generate_scenes

    style = style or PLAIN
    n_a = (n + 1) // 2
    scenes = generate_scenes(n_a, "a", seed, dict(weights["a"]), size=size, style=style)
    if n > n_a:  # one scene in all is subset A's (generate_scenes refuses n=0)
        scenes += generate_scenes(n - n_a, "b", seed, dict(weights["b"]), size=size, style=style)
    return scenes


def _encode(processor, items) -> dict[str, "torch.Tensor"]:
    """Teacher-forcing batch of (image, question, answer): prompt + `` {Answer}</s>``, left
    padded, so the targets are the last two tokens of every row."""
    texts = [prompt(q) + " " + a + "</s>" for _, q, a in items]
    enc = processor(images=[im for im, _, _ in items], text=texts, return_tensors="pt",
                    padding=True)
    mask = enc["attention_mask"]
    enc["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return enc


def _lr_at(step: int, steps: int, warmup: int, decay: float = 0.25) -> float:
    """Warm-up, stable, decay: linear warm-up, constant, then cosine to 5% over the last
    ``decay`` of the run (a multiplier of the peak learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    start = int(steps * (1 - decay))
    if step < start:
        return 1.0
    t = (step - start) / max(1, steps - start)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_organism(out_dir: str | Path, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
                   relation_weights: Mapping[str, Mapping[str, float]] | None = None,
                   minutes: float | None = None, log: Log | None = print, small: bool = False,
                   projector_lr_mult: float = 1.0, weight_decay: float = 0.05,
                   threads: int = 2, log_every: int = 25, style: str = DEFAULT_STYLE
                   ) -> dict[str, Any]:
    """Train the organism from scratch and save it to ``out_dir``; return training stats.

    The model starts from :func:`build_organism` (seeded, with the wired init). Every step
    sees ``batch_size`` fresh scenes (one pass over ``steps * batch_size`` seeded scenes, half
    per subset, shuffled by a seeded generator), so the run is deterministic for a given
    seed and thread count (``threads``, restored afterwards). The loss
    is the cross-entropy of the answer word and ``</s>`` after ``ASSISTANT:``; AdamW with
    warm-up, a constant phase and a cosine decay over the last 25%. ``minutes`` stops early
    (the schedule is still sized for ``steps``). ``style`` is the training scenes'
    :class:`vislens.synth.SceneStyle` in its ``--style`` syntax (distractors, occlusion,
    texture, clutter). Stats: config, per-step losses, final loss, time; also written to
    ``out_dir/training.json``.
    """
    import torch

    from ..synth import SceneStyle

    scene_style = SceneStyle.parse(style)
    if steps < 1 or batch_size < 1:
        raise VislensError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    weights = {k: dict(v) for k, v in (relation_weights or RELATION_WEIGHTS).items()}
    if set(weights) != {"a", "b"}:
        raise VislensError("relation_weights must map both subsets 'a' and 'b' to weights")
    say = log or (lambda msg: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(out_dir, seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                      weights=weights, minutes=minutes, say=say, small=small,
                      projector_lr_mult=projector_lr_mult, weight_decay=weight_decay,
                      threads=threads, log_every=log_every, style=style, scene_style=scene_style)
    finally:
        torch.set_num_threads(previous)


def _train(out_dir, *, seed, steps, batch_size, lr, weights, minutes, say, small,
           projector_lr_mult, weight_decay, threads, log_every, style, scene_style
           ) -> dict[str, Any]:
    """The training loop of :func:`train_organism` (arguments already checked)."""
    import torch

    from ..synth import object_names

    torch.manual_seed(seed)
    arch = SMALL if small else ORGANISM
    model, processor = build_organism(seed=seed, small=small)
    model.train()
    n_scenes = steps * batch_size
    t0 = time.perf_counter()
    scenes = _training_scenes(n_scenes, seed, weights, arch["image_size"], scene_style)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_scenes, generator=gen).tolist()
    say(f"organism: {count_parameters(model)['total']:,} parameters, {n_scenes} scenes "
        f"({time.perf_counter() - t0:.1f}s to generate), {steps} steps of {batch_size}")

    proj = list(model.model.multi_modal_projector.parameters())
    proj_ids = {id(p) for p in proj}
    rest = [p for p in model.parameters() if id(p) not in proj_ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr},
                             {"params": proj, "lr": lr * projector_lr_mult}],
                            lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 20)
    losses: list[float] = []
    accs: list[float] = []
    t_start = time.perf_counter()
    stopped = None
    for step in range(steps):
        if minutes is not None and time.perf_counter() - t_start > 60 * minutes:
            stopped = f"time limit of {minutes:g} min reached after {step} steps"
            say(stopped)
            break
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * _lr_at(step, steps, warmup)
        batch = [scenes[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        enc = _encode(processor, [(s.image, s.sample.question, s.sample.answer) for s in batch])
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    position_ids=enc["position_ids"], pixel_values=enc["pixel_values"],
                    logits_to_keep=3)
        logits = out.logits[:, :2].float()  # predictions of the answer word and of </s>
        target = enc["input_ids"][:, -2:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        accs.append(float((logits[:, 0].argmax(-1) == target[:, 0]).float().mean()))
        if (step + 1) % log_every == 0 or step == 0 or step == steps - 1:
            k = min(log_every, len(losses))
            el = time.perf_counter() - t_start
            say(f"step {step + 1:5d}/{steps}  loss {sum(losses[-k:]) / k:.4f}  "
                f"answer acc {sum(accs[-k:]) / k:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{(step + 1) / el:.2f} steps/s  {el / 60:.1f} min")
    train_s = time.perf_counter() - t_start
    model.eval()
    out_path = Path(out_dir)
    save(model, processor, out_path)
    tail = losses[-min(50, len(losses)):]
    stats: dict[str, Any] = {
        "seed": seed, "steps": len(losses), "steps_planned": steps, "batch_size": batch_size,
        "lr": lr, "projector_lr_mult": projector_lr_mult, "weight_decay": weight_decay,
        "threads": threads, "relation_weights": weights, "style": style, "n_scenes": len(losses) * batch_size,
        "image_size": arch["image_size"], "objects": object_names(), "small": small,
        "architecture": dict(arch), "vocab_size": len(processor.tokenizer),
        "parameters": count_parameters(model), "train_seconds": round(train_s, 1),
        "seconds_per_step": round(train_s / max(1, len(losses)), 3),
        "final_loss": round(sum(tail) / max(1, len(tail)), 4),
        "final_answer_accuracy": round(sum(accs[-50:]) / max(1, len(accs[-50:])), 4),
        "stopped_early": stopped, "losses": [round(x, 5) for x in losses],
        "torch": torch.__version__,
    }
    (out_path / TRAIN_FILE).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    say(f"trained in {train_s / 60:.1f} min, final loss {stats['final_loss']:.4f}; saved to {out_path}")
    return stats
