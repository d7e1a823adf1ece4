"""Capture files: one crash-safe, resumable, self-describing HDF5 file per capture job.

A job writes a *working file* whose every dataset is created at its final size with all
storage allocated up front (uncompressed, fixed-length strings, attributes written once),
so that afterwards the writer only overwrites raw bytes in place and never changes HDF5
metadata: a ``kill -9`` at any moment leaves a readable file. Each batch is committed by
writing its rows, flushing, then setting the per-condition ``done`` flags and flushing
again, so a sample is either complete or redone on resume. When every sample is done (or
failed), :meth:`CaptureWriter.finalize` rewrites the file compressed (variable-length
strings, gzip + shuffle, ``complete=True``) into ``FILE.tmp`` and atomically replaces
``FILE``. The reader (:func:`open_capture`) reads working and final files the same way.
The format is specified in ``docs/capture-format.md``.

One module per concern: :mod:`.format` (constants, encoding, file helpers), :mod:`.lock`
(one writer per file), :mod:`.writer` (job spec, working file, commit protocol, finalize),
:mod:`.compact` (the final layout), :mod:`.edit` (shards, merge, box editing) and
:mod:`.reader` (:class:`Capture`). Import the public names from ``vislens.store``.
"""
from __future__ import annotations

from .edit import merge, parse_shard, replace_boxes, shard_path, shard_rows
from .format import FINGERPRINT_CHARS, FORMAT, FORMAT_VERSION, PREDICTION_BYTES, REASON_BYTES
from .lock import OutputLock, lock_output
from .reader import Capture, open_capture
from .writer import CaptureJob, CaptureWriter, sample_fingerprint, working_file_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PREDICTION_BYTES",
    "REASON_BYTES",
    "FINGERPRINT_CHARS",
    "Capture",
    "CaptureJob",
    "CaptureWriter",
    "OutputLock",
    "merge",
    "open_capture",
    "shard_path",
    "parse_shard",
    "shard_rows",
    "lock_output",
    "sample_fingerprint",
    "working_file_bytes",
    "replace_boxes",
]
