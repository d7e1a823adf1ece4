"""A capture at the real scale: 7B-shaped LLaVA-1.5 and Qwen2-VL with random weights on CUDA.

Timing does not depend on weight values, so the models are built from configs with the
published 7B shapes (no download) directly on the GPU in bfloat16. For each family the script
runs ``run_capture`` over synthetic scenes with baseline, ScalingVis alpha 0.5 and 2 and one
AdaptVis condition, and prints, measured in one run:

  * samples/s of the capture (all four conditions);
  * recording overhead: one prefill with the answer row recorded vs plain SDPA;
  * AdaptVis vs greedy decoding on the same batch;
  * peak GPU memory;
  * the HDF5 writer's share of the capture's wall time;
  * the prefill's achieved bf16 TFLOP/s and its fraction of the GPU's peak
    (a ~600-token prefill of a 7B model is ~2 x 7e9 x 600 = 8.4 TFLOP).

Without CUDA it prints a line and exits 0. ``--shape tiny --device cpu`` runs the same code
path on small configs (used by the tests).

Usage: python benchmarks/bench_gpu.py [--families llava,qwen2_vl] [--samples 64]
       [--batch-size 16] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench_steering import forward_pair  # same directory: the shared forward pair

#: published shapes (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct) and tiny stand-ins
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "7b": {
        "llava": dict(vocab=32064, hidden=4096, inter=11008, layers=32, heads=32, kv=32,
                      v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16, image=336, patch=14),
        "qwen2_vl": dict(vocab=152064, hidden=3584, inter=18944, layers=28, heads=28, kv=4,
                         v_embed=1280, v_layers=32, v_heads=16, patch=14, image=672),
    },
    "tiny": {
        "llava": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2,
                      v_hidden=32, v_inter=64, v_layers=2, v_heads=2, image=48, patch=2),
        "qwen2_vl": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2,
                         v_embed=32, v_layers=2, v_heads=2, patch=14, image=112),
    },
}
QUESTION = "Where is the ball in relation to the box? Answer with left, right, on or under."
CONDITIONS = ["baseline", "scaling:alpha=0.5", "scaling:alpha=2",
              "adaptvis:alpha1=0.5,alpha2=2,beta=0.3"]


def build(family: str, shape: dict[str, Any], device: str, dtype):
    """A randomly initialised ``family`` model of ``shape`` on ``device`` and its adapter."""
    import torch
    from transformers import LlamaConfig

    from vislens.models.llava import LlavaAdapter
    from vislens.models.qwen2_vl import Qwen2VLAdapter
    from vislens.models.tiny import (BASE_WORDS, LLAVA_TEMPLATE, llava_tokenizer,
                                     qwen_tokenizer)
    from vislens.steering import register_attention
    from vislens.synth import object_names

    words = list(BASE_WORDS) + object_names()
    s = shape
    if family == "llava":
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        tok = llava_tokenizer(words)
        ids = tok.convert_tokens_to_ids
        text = LlamaConfig(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"],
                           intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                           num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                           max_position_embeddings=4096, rms_norm_eps=1e-5,
                           pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"),
                           eos_token_id=ids("</s>"))
        vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                                  num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                                  image_size=s["image"], patch_size=s["patch"])
        grid = s["image"] // s["patch"]
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_seq_length=grid * grid)
        cls, adapter_cls = LlavaForConditionalGeneration, LlavaAdapter
        ip = CLIPImageProcessor(size={"shortest_edge": s["image"]},
                                crop_size={"height": s["image"], "width": s["image"]})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=s["patch"],
                              vision_feature_select_strategy="default",
                              chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    elif family == "qwen2_vl":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                                  Qwen2VLImageProcessor)

        from vislens.models.tiny import mrope_section, qwen_processor
        from transformers import Qwen2VLProcessor

        tok = qwen_tokenizer(words)
        ids = tok.convert_tokens_to_ids
        mrope = mrope_section(s["hidden"] // s["heads"])
        text = dict(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"],
                    intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                    num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                    max_position_embeddings=32768, bos_token_id=None,
                    eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                    rope_scaling={"type": "mrope", "mrope_section": mrope},
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": mrope})
        vision = dict(depth=s["v_layers"], embed_dim=s["v_embed"], hidden_size=s["hidden"],
                      num_heads=s["v_heads"], patch_size=s["patch"], spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=4, in_channels=3)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"))
        cls, adapter_cls = Qwen2VLForConditionalGeneration, Qwen2VLAdapter
        pixels = s["image"] ** 2  # every scene is resized to exactly image x image
        ip = Qwen2VLImageProcessor(patch_size=s["patch"], merge_size=2, temporal_patch_size=2,
                                   min_pixels=pixels, max_pixels=pixels)
        proc = qwen_processor(Qwen2VLProcessor, ip, tok)
    else:
        raise SystemExit(f"bench_gpu: unknown family {family!r} (llava, qwen2_vl)")
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.set_attn_implementation({"text_config": register_attention()})
    return adapter_cls(model, proc, f"random-{family}")


def param_counts(model) -> tuple[int, int]:
    """(language-model parameters without embeddings, vision-tower + projector parameters)."""
    text = vision = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        if "vision" in name or "visual" in name or "multi_modal_projector" in name:
            vision += p.numel()
        else:
            text += p.numel()
    return text, vision


def timed(fn: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call, synchronising the device."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(family: str, args, tmp: Path) -> dict[str, float]:
    import torch

    from vislens import store
    from vislens.capture import run_capture
    from vislens.decoding import DecodingEngine, parse_condition
    from vislens.synth import generate_groups, write_scenes

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPES[args.shape][family]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    adapter = build(family, shape, args.device, dtype)
    sync()
    t_build = time.perf_counter() - t0
    p_text, p_vision = param_counts(adapter.model)
    scenes = write_scenes(generate_groups(max(1, args.samples // 4), "a", seed=0), tmp / family,
                          name="scenes.jsonl")

    # one batch of real prompts for the forward and decode ratios
    from PIL import Image
    with open(scenes.parent / "scenes.jsonl") as f:
        import json
        first = [json.loads(line) for line in f][: args.batch_size]
    imgs = [Image.open(scenes.parent / r["image"]).convert("RGB") for r in first]
    batch = adapter.prepare(imgs, [QUESTION] * len(imgs))
    n_tok = int(batch.input_ids.shape[1])
    n_img = int(batch.image_keys[0].sum())
    plain, recorded = forward_pair(adapter, batch)
    t_plain = timed(plain, sync, args.repeats)
    t_rec = timed(recorded, sync, args.repeats)
    engine = DecodingEngine(adapter, max_new_tokens=args.max_new_tokens)
    opts = [["Left", "Right", "On", "Under"]] * len(imgs)
    qs = [QUESTION] * len(imgs)
    greedy, adapt = [parse_condition("baseline")], [parse_condition(CONDITIONS[-1])]
    t_greedy = timed(lambda: engine.run(imgs, qs, opts, greedy), sync, args.repeats)
    t_adapt = timed(lambda: engine.run(imgs, qs, opts, adapt), sync, args.repeats)

    writer_s = [0.0]

    def wrap(fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                writer_s[0] += time.perf_counter() - t
        return inner

    orig = store.CaptureWriter.write_batch, store.CaptureWriter.finalize
    store.CaptureWriter.write_batch, store.CaptureWriter.finalize = wrap(orig[0]), wrap(orig[1])
    try:
        t0 = time.perf_counter()
        summary = run_capture(model=adapter, dataset=f"jsonl:{scenes}", out=tmp / f"{family}.h5",
                              conditions=CONDITIONS, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=False,
                              log=lambda m: None)
        sync()
        t_capture = time.perf_counter() - t0
    finally:
        store.CaptureWriter.write_batch, store.CaptureWriter.finalize = orig
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    B = len(imgs)
    # 2 FLOP per parameter and token (dense), plus QK^T and PV over the full square
    attn = 4 * shape["layers"] * B * n_tok * n_tok * shape["hidden"]
    patches = (shape["image"] // shape["patch"]) ** 2 if family == "llava" else n_img * 4
    flops = 2 * p_text * B * n_tok + 2 * p_vision * B * patches + attn
    del adapter, engine
    if cuda:
        torch.cuda.empty_cache()
    return {"build_s": t_build, "params_text": p_text, "params_vision": p_vision,
            "tokens": n_tok, "image_tokens": n_img, "batch": B,
            "samples_per_s": summary.n_total / t_capture, "capture_s": t_capture,
            "n": summary.n_total, "record_ratio": t_rec / t_plain, "plain_ms": t_plain * 1e3,
            "adapt_ratio": t_adapt / t_greedy, "peak_gib": peak / 2**30,
            "writer_share": writer_s[0] / t_capture, "prefill_tflops": flops / t_plain / 1e12,
            "prefill_tflop": flops / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="llava,qwen2_vl")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; skipped (run it on a GPU machine, or use "
              "--shape tiny --device cpu to exercise the code path)")
        return 0
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    with tempfile.TemporaryDirectory() as tmp:
        for family in [f.strip() for f in args.families.split(",") if f.strip()]:
            r = measure(family, args, Path(tmp))
            print(f"\n## {family} ({args.shape}: {r['params_text'] / 1e9:.2f}B text + "
                  f"{r['params_vision'] / 1e9:.2f}B vision parameters; built in {r['build_s']:.1f} s)")
            print(f"prompt: {r['tokens']} tokens ({r['image_tokens']} image), batch {r['batch']}")
            print(f"capture: {r['n']} samples x {len(CONDITIONS)} conditions in "
                  f"{r['capture_s']:.1f} s -> {r['samples_per_s']:.2f} samples/s")
            print(f"recording vs plain SDPA prefill: {r['record_ratio']:.3f}x "
                  f"(plain {r['plain_ms']:.1f} ms per batch)")
            print(f"AdaptVis vs greedy: {r['adapt_ratio']:.3f}x")
            print(f"peak GPU memory: {r['peak_gib']:.1f} GiB")
            print(f"writer share of capture wall time: {r['writer_share']:.1%}")
            print(f"prefill: {r['prefill_tflop']:.1f} TFLOP per batch at {r['prefill_tflops']:.0f} "
                  f"TFLOP/s = {r['prefill_tflops'] / args.peak_tflops:.1%} of {args.peak_tflops:.0f} "
                  "TFLOP/s peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
