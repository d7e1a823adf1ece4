"""vislens: capture, steer and analyse where a VLM's answer position looks in the image.

Data flow, one module per stage::

    data/ -> models/ (adapters, image layouts) -> steering (hook points, interventions)
          -> decoding (conditions, prefix cache) -> store (HDF5 capture files)
          -> metrics -> report / plots -> cli
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "load_model", "open_capture", "view"]


def __getattr__(name: str):  # lazy: importing vislens must not import torch
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "open_capture":
        from .store import open_capture

        return open_capture
    if name == "view":  # the explorer in a notebook cell: vislens.view("capture.h5")
        from .viewer import view

        return view
    raise AttributeError(name)
