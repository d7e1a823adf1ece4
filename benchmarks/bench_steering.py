"""Steering/recording overhead on a tiny-but-real-length LLaVA (576 image tokens, ~600 total).

Prints ratios measured in one run (targets from the core issue and issue 15):
  * recording + SDPA vs plain SDPA forward              target <= 1.10x (issue 15: 1.05x)
  * AdaptVis vs greedy decoding on the same inputs       target <= 1.15x (issue 15: 1.05x)
  * peak memory of recording vs eager output_attentions  target <= 1/20
  * model forward calls per batch and time vs greedy, each distinct steering setting in its
    own pass (max_fused_rows=1), all settings of a batch as one B x K batch over K repeated
    copies of the prefix cache (share_prefix=False), and over one shared copy (the default),
    for AdaptVis, the paper's condition set and a sweep validation pass (baseline + 5
    alphas)                                          sweep target <= 1.15x greedy

Usage: python benchmarks/bench_steering.py [--hidden 256] [--layers 4] [--repeats 10]
           [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _timing import paired
import torch

QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."


def images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")) for _ in range(n)]


def _medians(times):
    return tuple(float(np.median(t)) for t in times)


def forward_pair(adapter, batch):
    """Two prefill forwards of ``batch``: plain SDPA, and with the answer row recorded."""
    from vislens.steering import Steerer

    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, logits_to_keep=1, **batch.vision)

    def plain():
        with torch.inference_mode():
            adapter.model(**kw)

    def recorded():
        with torch.inference_mode(), Steerer(batch.image_keys, record=True):
            adapter.model(**kw)

    return plain, recorded


def forward_ratio(adapter, batch, repeats: int) -> tuple[float, float]:
    return _medians(paired(*forward_pair(adapter, batch), repeats))


def decode_ratio(adapter, imgs, repeats: int, max_new_tokens: int) -> tuple[float, float]:
    from vislens.decoding import DecodingEngine, parse_condition

    engine = DecodingEngine(adapter, max_new_tokens=max_new_tokens)
    qs, opts = [QUESTION] * len(imgs), [["Left", "Right", "On", "Under"]] * len(imgs)
    greedy = [parse_condition("baseline")]
    adapt = [parse_condition("adaptvis:alpha1=0.5,alpha2=2.0,beta=0.3")]
    return _medians(paired(lambda: engine.run(imgs, qs, opts, greedy),
                           lambda: engine.run(imgs, qs, opts, adapt), repeats))


CONDITION_SETS = {
    "AdaptVis": ["adaptvis:alpha1=0.5,alpha2=2.0,beta=0.3"],
    "paper set": ["baseline", "scaling:alpha=0.5", "scaling:alpha=2", "adaptvis:alpha1=0.5,alpha2=2,beta=0.3"],
    "sweep (6 alphas)": ["baseline"] + [f"scaling:alpha={a}" for a in (0.5, 0.8, 1.2, 1.5, 2.0)],
}


#: engine settings of the fused table's columns: one pass per setting, the settings fused
#: over K repeated copies of the prefix cache, and fused over one shared copy (the default)
FUSING = {"unfused": dict(max_fused_rows=1), "fused, repeated cache": dict(share_prefix=False),
          "fused, shared prefix": {}}


def fused_table(adapter, imgs, repeats: int, max_new_tokens: int) -> None:
    """Forward calls per batch and time vs greedy under each column of :data:`FUSING`."""
    from vislens.decoding import DecodingEngine, parse_condition

    qs, opts = [QUESTION] * len(imgs), [["Left", "Right", "On", "Under"]] * len(imgs)
    greedy = [parse_condition("baseline")]
    print(f"settings fused over the prefix cache ({max_new_tokens} new tokens, batch "
          f"{len(imgs)}; record=False for the sweep like its validation pass); "
          f"time vs greedy: {' -> '.join(FUSING)}:")
    for label, specs in CONDITION_SETS.items():
        conds = [parse_condition(c) for c in specs]
        record = not label.startswith("sweep")
        row = []
        for kw in FUSING.values():
            eng = DecodingEngine(adapter, max_new_tokens=max_new_tokens, record=record, **kw)
            base = DecodingEngine(adapter, max_new_tokens=max_new_tokens, record=record)
            eng.run(imgs, qs, opts, conds)
            base.run(imgs, qs, opts, greedy)
            calls, greedy_calls = eng.forward_calls, base.forward_calls
            t_g, t_c = _medians(paired(lambda: base.run(imgs, qs, opts, greedy),
                                       lambda: eng.run(imgs, qs, opts, conds), repeats))
            row.append((calls, greedy_calls, t_c / t_g))
        target = "  (target <= 1.15x)" if label.startswith("sweep") else ""
        print(f"  {label:17s} forward calls/batch {row[0][0]:3d} -> {row[-1][0]:3d} "
              f"(greedy {row[0][1]}); time vs greedy "
              f"{' -> '.join(f'{r:.2f}x' for _, _, r in row)}{target}")


def memory_child(model_dir: str, mode: str) -> None:
    """Run one cold forward in a fresh process and print its peak RSS growth (bytes)."""
    from vislens.models import load_model
    from vislens.steering import Steerer

    adapter = load_model(model_dir, dtype="float32", device="cpu")
    batch = adapter.prepare(images(1), [QUESTION])
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, logits_to_keep=1, **batch.vision)
    if mode == "eager":
        adapter.model.set_attn_implementation({"text_config": "eager"})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.inference_mode():
        if mode == "eager":
            out = adapter.model(**kw, output_attentions=True)
            kept = sum(a.numel() * a.element_size() for a in out.attentions)
        else:
            with Steerer(batch.image_keys, record=True) as s:
                adapter.model(**kw)
            kept = sum(r.numel() * r.element_size() for r in s.records.values())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": after - before, "kept": kept}))


def memory(model_dir: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: one per core); 1 is steadier on a loaded machine")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(*args.child)
        return
    from vislens.models import load_model
    from vislens.models.tiny import build_tiny

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny("llava", Path(tmp) / "m", hidden=args.hidden, layers=args.layers,
                          heads=args.heads, kv_heads=args.heads // 2)
        adapter = load_model(path, dtype="float32", device="cpu")
        imgs = images(args.batch)
        batch = adapter.prepare(imgs, [QUESTION] * args.batch)
        n = batch.input_ids.shape[1]
        print(f"model: tiny LLaVA hidden={args.hidden} layers={args.layers} heads={args.heads}; "
              f"batch={args.batch}, sequence={n} tokens ({int(batch.image_keys[0].sum())} image); "
              f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
        t_plain, t_rec = forward_ratio(adapter, batch, args.repeats)
        print(f"forward: plain SDPA {t_plain * 1e3:.1f} ms, recording {t_rec * 1e3:.1f} ms "
              f"-> ratio {t_rec / t_plain:.3f}x (target <= 1.10x)")
        t_g, t_a = decode_ratio(adapter, imgs, args.repeats, args.max_new_tokens)
        print(f"decode ({args.max_new_tokens} new tokens): greedy {t_g * 1e3:.1f} ms, AdaptVis "
              f"{t_a * 1e3:.1f} ms -> ratio {t_a / t_g:.3f}x (target <= 1.15x; two full "
              f"generations would be ~2x)")
        fused_table(adapter, imgs, max(3, args.repeats // 2), args.max_new_tokens)
        m_rec, m_eag = memory(path, "record"), memory(path, "eager")
        print(f"memory: attention data held by recording {m_rec['kept'] / 2**20:.3f} MiB vs "
              f"output_attentions {m_eag['kept'] / 2**20:.1f} MiB -> ratio "
              f"{m_rec['kept'] / m_eag['kept']:.4f} (target <= 0.05)")
        print(f"        whole cold forward, peak RSS growth: recording+SDPA "
              f"{m_rec['peak_growth'] / 2**20:.1f} MiB vs eager+output_attentions "
              f"{m_eag['peak_growth'] / 2**20:.1f} MiB -> ratio "
              f"{m_rec['peak_growth'] / max(m_eag['peak_growth'], 1):.3f}")


if __name__ == "__main__":
    main()
