"""benchmarks/bench_gpu.py: the 7B shapes are the published ones, and the script's code path runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("family, total", [("llava", 7.06e9), ("qwen2_vl", 8.29e9)])
def test_seven_b_shapes_have_the_published_parameter_counts(family, total):
    # llava-hf/llava-1.5-7b-hf: 7.06B parameters; Qwen/Qwen2-VL-7B-Instruct: 8.29B
    adapter = bench_gpu.build(family, bench_gpu.SHAPES["7b"][family], "meta", torch.bfloat16)
    n = sum(p.numel() for p in adapter.model.parameters())
    assert n == pytest.approx(total, rel=0.01)
    text, vision = bench_gpu.param_counts(adapter.model)
    assert text + vision < n and vision < 0.1 * n


def test_without_cuda_the_benchmark_skips_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run for real")
    assert bench_gpu.main([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_tiny_cpu_run_reports_every_figure(capsys):
    assert bench_gpu.main(["--shape", "tiny", "--device", "cpu", "--families", "llava",
                           "--samples", "4", "--batch-size", "2", "--repeats", "1",
                           "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    for what in ("samples/s", "recording vs plain SDPA", "AdaptVis vs greedy",
                 "peak GPU memory", "writer share", "of 989 TFLOP/s peak"):
        assert what in out
