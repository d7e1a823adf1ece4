"""Where each image token sits: sequence position and the image rectangle it covers.

Every adapter describes its input as an :class:`ImageLayout`: for each image token, its index
in the (padded) sequence and the rectangle of the *original* image it sees, in normalised
coordinates ``(x0, y0, x1, y1)`` in [0, 1]. Non-spatial tokens (LLaVA-NeXT's image-newline)
have NaN rectangles. A per-token vector (e.g. attention weights) is projected by area onto a
canonical ``G x G`` analysis grid laid over the original image, so maps from different models
and resolutions line up with each other and with object boxes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageLayout:
    """The image tokens of one sequence.

    ``positions`` [T] sequence indices; ``rects`` [T, 4] normalised rectangles (NaN for
    non-spatial tokens); ``image_size`` the original (width, height) in pixels; ``kinds`` a
    short label per token (``"patch"``, ``"base"``, ``"tile"``, ``"newline"``).
    """

    positions: np.ndarray
    rects: np.ndarray
    image_size: tuple[int, int]
    kinds: np.ndarray
    _proj: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _entries: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.rects) or len(self.rects) != len(self.kinds):
            raise ValueError(f"layout has {len(self.positions)} positions, {len(self.rects)} "
                             f"rectangles and {len(self.kinds)} kinds")

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def spatial(self) -> np.ndarray:
        """Boolean [T]: tokens that cover a part of the image."""
        return ~np.isnan(self.rects).any(axis=1)

    def projection(self, grid: int = 24) -> np.ndarray:
        """[T, G*G] matrix: the fraction of token t's rectangle that falls in each cell.

        Rows of spatial tokens sum to 1 (mass is preserved); non-spatial rows are zero.
        """
        if grid not in self._proj:
            self._proj[grid] = area_projection(self.rects, grid)
        return self._proj[grid]

    def projection_entries(self, grid: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-zero entries of :meth:`projection` as (token, cell, weight) arrays."""
        if grid not in self._entries:
            proj = self.projection(grid)
            tok, cell = np.nonzero(proj)
            self._entries[grid] = (tok, cell, proj[tok, cell])
        return self._entries[grid]

    def to_grid(self, values: np.ndarray, grid: int = 24) -> np.ndarray:
        """Project ``values[..., T]`` onto the analysis grid: ``[..., G, G]``."""
        values = np.asarray(values)
        out = values @ self.projection(grid)
        return out.reshape(*values.shape[:-1], grid, grid)

    @property
    def view(self) -> tuple[float, float, float, float]:
        """The rectangle of the original image that some token sees, normalised ``(x0, y0,
        x1, y1)``: the bounding box of the spatial tokens (a centre crop's kept square)."""
        r = self.rects[self.spatial]
        if not len(r):
            return (0.0, 0.0, 0.0, 0.0)
        lo, hi = np.clip(r[:, :2].min(axis=0), 0, 1), np.clip(r[:, 2:].max(axis=0), 0, 1)
        return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))

    def visible(self, grid: int = 24) -> np.ndarray:
        """[G, G]: the fraction of each cell that some token sees (center crops hide edges)."""
        cover = area_projection(self.rects, grid, normalise=False).sum(axis=0)
        return np.clip(cover.reshape(grid, grid) * grid * grid, 0.0, 1.0)


def area_projection(rects: np.ndarray, grid: int, *, normalise: bool = True) -> np.ndarray:
    """Overlap of each rectangle with the cells of a ``grid x grid`` partition of [0, 1]^2.

    With ``normalise`` each row is divided by its rectangle's area (fractions of the token);
    otherwise entries are absolute areas in the unit square. NaN rectangles give zero rows.
    """
    rects = np.asarray(rects, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, grid + 1)
    lo, hi = edges[:-1], edges[1:]
    ok = ~np.isnan(rects).any(axis=1)
    r = np.where(ok[:, None], rects, 0.0)
    ox = np.clip(np.minimum(r[:, 2:3], hi) - np.maximum(r[:, 0:1], lo), 0.0, None)  # [T, G]
    oy = np.clip(np.minimum(r[:, 3:4], hi) - np.maximum(r[:, 1:2], lo), 0.0, None)  # [T, G]
    cells = oy[:, :, None] * ox[:, None, :]  # [T, G(rows), G(cols)]
    cells = cells.reshape(len(r), grid * grid)
    if normalise:
        area = cells.sum(axis=1, keepdims=True)
        cells = np.divide(cells, area, out=np.zeros_like(cells), where=area > 0)
    cells[~ok] = 0.0
    return cells


def grid_rects(rows: int, cols: int, view: tuple[float, float, float, float] = (0, 0, 1, 1),
               ) -> np.ndarray:
    """Rectangles of a row-major ``rows x cols`` grid laid uniformly over ``view``."""
    x0, y0, x1, y1 = view
    r, c = np.divmod(np.arange(rows * cols), cols)
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return np.stack([x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h], axis=1)
