"""Errors vislens raises for bad input: one line that names the file, field or value."""
from __future__ import annotations


class VislensError(ValueError):
    """Bad input or state detected before (or without) corrupting any output.

    The CLI prints ``vislens: error: <message>`` and exits with status 2; library users
    catch it like any ``ValueError``.
    """
