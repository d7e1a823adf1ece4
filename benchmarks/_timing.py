"""Shared timing helper of the benchmark scripts."""
from __future__ import annotations

import time


def paired(fa, fb, repeats: int) -> tuple[list[float], list[float]]:
    """Times of two functions run alternately (machine load hits both alike), after one
    warm-up call each."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return ta, tb
