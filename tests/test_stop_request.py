"""A stop request (SIGTERM) sticks: a batch loop stops at its next batch even if the
exception the signal handler raised was swallowed (e.g. inside a finalizer)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vislens import jobs
from vislens.capture import run_batches
from vislens.data.base import Sample


class CountingEngine:
    """Answers every sample "Left"; asks for a stop after the first batch, as SIGTERM would."""

    def __init__(self):
        self.batches = 0

    def run(self, images, questions, options, conditions, sample_keys=None):
        self.batches += 1
        jobs.request_stop()  # the handler's exception is lost; only the flag remains
        return [{"baseline": SimpleNamespace(text="Left")} for _ in images]


def test_stop_request_ends_the_loop_at_the_next_batch(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    samples = [Sample(id=f"s{i}", image_path=str(img), question="Where is the a?",
                      options=["Left", "Right"], answer="Left") for i in range(6)]
    engine = CountingEngine()
    jobs.clear_stop()
    got = []
    try:
        with pytest.raises(jobs.Terminated):
            for b in run_batches(engine, samples, range(6), [SimpleNamespace(name="baseline")],
                                 batch_size=2):
                got.append(b.rows)
    finally:
        jobs.clear_stop()
    assert engine.batches == 1 and got == [[0, 1]]  # the finished batch is kept, no more run
    assert issubclass(jobs.Terminated, KeyboardInterrupt)
