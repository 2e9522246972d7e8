"""Vectorised smooth solids on a voxel grid for the SYNTHETIC phantom: deformed ellipsoids, tubes
and chains of capsules, each evaluated only inside its bounding box (cheap broadcasting of 1-D and
2-D factors, no full-volume 3-D noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """World coordinates (mm) of voxel centres along z, y, x (RAS: x right, y anterior, z superior)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)


Box = tuple[slice, slice, slice]


def _range(coord: np.ndarray, low: float, high: float) -> slice:
    return slice(int(np.searchsorted(coord, low)), int(np.searchsorted(coord, high, side="right")))


def box(grid: Grid, centre: tuple[float, float, float], extent: tuple[float, float, float]) -> Box:
    """Index box (z, y, x) covering centre (x, y, z) +- extent (x, y, z) in mm."""
    (cx, cy, cz), (ex, ey, ez) = centre, extent
    return (_range(grid.z, cz - ez, cz + ez), _range(grid.y, cy - ey, cy + ey), _range(grid.x, cx - ex, cx + ex))


def blob(grid: Grid, rng: np.random.Generator, centre: tuple[float, float, float],
         semi: tuple[float, float, float], angle_deg: float = 0.0, taper: float = 0.0, bend: float = 0.0,
         roughness: float = 0.2, terms: int = 3) -> tuple[Box, np.ndarray]:
    """A smooth, non-ellipsoidal solid: an ellipsoid rotated about z, tapered and bent along z and
    deformed by a few random low-frequency cosine products.

    centre (x, y, z) and semi-axes (a, b, c) are in mm; returns the index box and the implicit
    field f of the box's shape (Z', Y', X'): the solid is f < 1, its rim f close to 1.
    """
    a, b, c = semi
    reach = max(a, b) * (1.35 + abs(bend) + roughness) + 2.0
    bx = box(grid, centre, (reach, reach, c * (1.1 + roughness) + 2.0))
    x = grid.x[bx[2]] - centre[0]
    y = grid.y[bx[1]] - centre[1]
    w = (grid.z[bx[0]] - centre[2]) / c  # (Z',)
    cos, sin = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    u = (cos * x[None, :] + sin * y[:, None]) / a  # (Y', X') local axes in units of the semi-axes
    v = (-sin * x[None, :] + cos * y[:, None]) / b
    scale = (1.0 + taper * np.clip(w, -1.0, 1.0)) ** 2  # in-plane size changes along the long axis
    bent = u[None] - (bend * w**2)[:, None, None]  # (Z', Y', X')
    f = (bent**2 + (v**2)[None]) / scale[:, None, None] + (w**2)[:, None, None]
    for _ in range(terms):
        fu, fv, fw = rng.uniform(0.8, 2.6, 3)
        pu, pv, pw = rng.uniform(0, 2 * np.pi, 3)
        amp = roughness * rng.uniform(0.5, 1.0)
        plane = np.cos(fu * u + pu) * np.cos(fv * v + pv)  # (Y', X')
        f += amp * plane[None] * np.cos(fw * w + pw)[:, None, None]
    return bx, f


def tube(grid: Grid, rng: np.random.Generator, path_z: tuple[float, ...], path_x: tuple[float, ...],
         path_y: tuple[float, ...], radius: tuple[float, float], wobble: float = 0.08) -> tuple[Box, np.ndarray]:
    """A vessel-like tube along z whose centre follows a piecewise-linear path through the control
    points (x, y) at heights z (mm, increasing); elliptical cross-section radius (rx, ry) in mm."""
    rx, ry = radius
    zs = np.asarray(path_z, float)
    lo_x, hi_x = min(path_x) - rx - 2, max(path_x) + rx + 2
    lo_y, hi_y = min(path_y) - ry - 2, max(path_y) + ry + 2
    bx = (_range(grid.z, zs[0], zs[-1]), _range(grid.y, lo_y, hi_y), _range(grid.x, lo_x, hi_x))
    z = grid.z[bx[0]]
    cx, cy = np.interp(z, zs, path_x), np.interp(z, zs, path_y)
    swell = 1.0 + wobble * np.cos(z / rng.uniform(18, 35) + rng.uniform(0, 2 * np.pi))
    dx = (grid.x[bx[2]][None, :] - cx[:, None]) / (rx * swell[:, None])  # (Z', X')
    dy = (grid.y[bx[1]][None, :] - cy[:, None]) / (ry * swell[:, None])  # (Z', Y')
    return bx, (dx[:, None, :] ** 2 + dy[:, :, None] ** 2) < 1.0


def chain(grid: Grid, rng: np.random.Generator, points: list[tuple[float, float, float]],
          radii: list[float], lobulation: float = 0.0) -> tuple[Box, np.ndarray]:
    """A union of capsules through control points (x, y, z) mm with radii interpolated along each
    segment (pancreas, portal and splenic vein); `lobulation` adds a bumpy surface."""
    pts, rad = np.asarray(points, float), np.asarray(radii, float)
    pad = rad.max() * (1 + lobulation) + 2
    lo, hi = pts.min(0) - pad, pts.max(0) + pad
    bx = (_range(grid.z, lo[2], hi[2]), _range(grid.y, lo[1], hi[1]), _range(grid.x, lo[0], hi[0]))
    z, y, x = grid.z[bx[0]][:, None, None], grid.y[bx[1]][None, :, None], grid.x[bx[2]][None, None, :]
    inside = np.zeros((z.shape[0], y.shape[1], x.shape[2]), bool)
    phase = rng.uniform(0, 2 * np.pi, 3)
    for (p0, p1, r0, r1) in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        d = p1 - p0
        t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / float(d @ d)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        r = r0 + t * (r1 - r0)
        if lobulation:
            r = r * (1 + lobulation * np.cos(x / 6.0 + phase[0]) * np.cos(y / 5.0 + phase[1]) * np.cos(z / 4.0 + phase[2]))
        inside |= dist2 < r**2
    return bx, inside
