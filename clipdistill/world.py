"""Procedural stand-in for the PACS domain-generalisation benchmark: seven shape classes drawn
in four evaluated rendering styles (photo, painting, cartoon, sketch) plus train-only styles,
with web-like captions, so the whole pipeline can train and evaluate without downloading data.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import math
import pathlib
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .progress import progress

CLASSES: tuple[str, ...] = ("circle", "triangle", "square", "star", "heart", "cross", "crescent")
EVAL_DOMAINS: tuple[str, ...] = ("photo", "painting", "cartoon", "sketch")
TRAIN_ONLY_STYLES: tuple[str, ...] = ("neon", "silhouette", "mosaic", "chalk")
STYLES: tuple[str, ...] = EVAL_DOMAINS + TRAIN_ONLY_STYLES
# `world.source`: render this world (embedded) or read a PACS-style <root>/<domain>/<class>/ folder
SOURCES: tuple[str, ...] = ("embedded", "folder")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Shapes: unit polygons (circumradius 1 about the origin, image y axis pointing down)
# ----------------------------------------------------------------------------------------------

def _ring(k: int, start: float) -> np.ndarray:
    t = start + 2.0 * np.pi * np.arange(k) / k
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 2001)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    # Resample evenly by arc length (the raw parameter bunches points) so every vertex but the
    # dip (t=0) and the tip (t=pi, half-way round) turns only slightly.
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    even = np.linspace(0.0, arc[-1], 80, endpoint=False)
    pts = np.stack([np.interp(even, arc, x), np.interp(even, arc, y)], axis=1)
    # Centre on the bounding box so the heart does not drift off-centre when rotated.
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2.0
    return pts / np.linalg.norm(pts, axis=1).max()


def _cross(half_width: float = 0.32) -> np.ndarray:
    a = half_width
    pts = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                    (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], dtype=np.float64)
    return pts / math.hypot(1.0, a)


def _crescent(offset: float = 0.5, inner: float = 0.85) -> np.ndarray:
    # Boundary of (unit disc) minus (disc of radius `inner` centred at (offset, 0)): the outer arc
    # away from the bite, then the bite's arc back between the two intersection points.
    x1 = (1.0 - inner**2 + offset**2) / (2.0 * offset)
    y1 = math.sqrt(1.0 - x1**2)
    phi = math.atan2(y1, x1)
    outer = np.linspace(phi, 2.0 * np.pi - phi, 44)
    psi = math.atan2(y1, x1 - offset)
    bite = np.linspace(2.0 * np.pi - psi, psi, 28)[1:-1]
    pts = np.concatenate([
        np.stack([np.cos(outer), np.sin(outer)], axis=1),
        np.stack([offset + inner * np.cos(bite), inner * np.sin(bite)], axis=1),
    ])
    return pts


def _star(inner: float = 0.45) -> np.ndarray:
    # Fatter than a regular pentagram (0.38) so the points survive a 32 px render.
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    t = -np.pi / 2 + np.pi * np.arange(10) / 5
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


_UNIT_SHAPES: dict[str, np.ndarray] = {
    "circle": _ring(64, 0.0),
    "triangle": _ring(3, -np.pi / 2),
    "square": _ring(4, np.pi / 4),
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "crescent": _crescent(),
}
assert tuple(_UNIT_SHAPES) == CLASSES


def _turn_angles(pts: np.ndarray) -> np.ndarray:
    """Radians [k] by which the boundary of polygon pts [k, 2] changes direction at each vertex."""
    a = pts - np.roll(pts, 1, axis=0)
    b = np.roll(pts, -1, axis=0) - pts
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


_TURNS: dict[str, np.ndarray] = {c: _turn_angles(p) for c, p in _UNIT_SHAPES.items()}


@dataclass(frozen=True)
class _Pose:
    """A placed shape on an n x n canvas: centre (cx, cy), circumradius r, polygon pts [k, 2],
    and the turn angle at each vertex, turns [k] (radians)."""

    cx: float
    cy: float
    r: float
    pts: np.ndarray
    turns: np.ndarray


def _place(cls: str, n: int, rng: np.random.Generator) -> _Pose:
    r = rng.uniform(0.25, 0.45) * n
    slack = max(0.0, 0.5 * n - r - 0.03 * n)  # keep the whole shape inside the frame
    cx, cy = n / 2.0 + rng.uniform(-slack, slack, size=2)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    c, s = math.cos(theta), math.sin(theta)
    pts = _UNIT_SHAPES[cls] @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
    return _Pose(float(cx), float(cy), float(r), pts, _TURNS[cls])


def _jittered(pose: _Pose, n: int, rng: np.random.Generator, amount: float) -> np.ndarray:
    """The pose's polygon [k, 2] under a small random similarity transform (a hand-drawn retrace)."""
    scale = 1.0 + rng.normal(0.0, 0.03 * amount)
    ang = rng.normal(0.0, 0.04 * amount)
    shift = rng.normal(0.0, 0.012 * amount * n, size=2)
    c, s = math.cos(ang) * scale, math.sin(ang) * scale
    centre = np.array([pose.cx, pose.cy])
    return (pose.pts - centre) @ np.array([[c, s], [-s, c]]) + centre + shift


# ----------------------------------------------------------------------------------------------
# Raster helpers (images float32 [3, n, n] in 0..255, masks float32 [n, n] in 0..1)
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in canvas pixels as broadcastable x [1, n] and y [n, 1] (float32).

    Separable so that per-axis terms cost O(n) and only their combination costs O(n^2).
    """
    c = np.arange(n, dtype=np.float32) + 0.5
    c.setflags(write=False)
    return c[None, :], c[:, None]


def _fill_mask(pts: np.ndarray, n: int) -> np.ndarray:
    im = Image.new("L", (n, n), 0)
    ImageDraw.Draw(im).polygon(pts.ravel().tolist(), fill=255)
    return np.asarray(im, dtype=np.float32) / 255.0


def _outline_mask(pts: np.ndarray, turns: np.ndarray, n: int, width: float) -> np.ndarray:
    """Coverage [n, n] of a closed stroke `width` px wide along polygon pts [k, 2] with vertex turn
    angles turns [k]."""
    im = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(im)
    w = max(1, round(width))
    draw.line(np.concatenate([pts, pts[:1]]).ravel().tolist(), fill=255, width=w)
    # PIL's wide segments leave a wedge-shaped notch (outer width ~ w/2 * turn) at each vertex;
    # plug with a round joint only where that notch would be visible, as per-vertex joints on
    # every curve vertex would dominate the render time at 32 px.
    h = w / 2.0
    for x, y in pts[h * turns > 0.4].tolist():
        draw.ellipse((x - h, y - h, x + h, y + h), fill=255)
    return np.asarray(im, dtype=np.float32) / 255.0


def _blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian-blurred copy of a [n, n] mask in 0..1 (PIL blurs 8-bit images only)."""
    im = Image.fromarray(np.rint(mask * 255.0).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _value_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth noise float32 [n, n], roughly in [0, 1], with `cells` features across the image."""
    g = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(g).resize((n, n), Image.BICUBIC), dtype=np.float32)


def _linear_ramp(n: int, angle: float) -> np.ndarray:
    """float32 [n, n] ramp from 0 to 1 across the image along direction `angle`."""
    x, y = _grid(n)
    k = np.float32(1.0 / (n * math.sqrt(2.0)))
    t = ((x - n / 2) * (math.cos(angle) * k)) + ((y - n / 2) * (math.sin(angle) * k))
    return t + 0.5


def _cf(x: np.ndarray) -> np.ndarray:
    """A colour [3] as a broadcastable [3, 1, 1]; images [3, n, n] pass through."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(3, 1, 1) if x.ndim == 1 else x


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colours [3] / images [3, n, n] from a to b by weight t [n, n]; returns [3, n, n]."""
    a = _cf(a)
    out = (_cf(b) - a) * t
    out += a  # in place: fewer 200 KB temporaries is measurably faster
    return out


def _paste(img: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Composite `colour` ([3] or [3, n, n]) over img [3, n, n] with coverage mask [n, n]."""
    out = _cf(colour) - img
    out *= mask
    out += img
    return out


def _solid(colour: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(_cf(colour), (3, n, n)).astype(np.float32)


def _to_pil(img: np.ndarray) -> Image.Image:
    """RGB image from a float canvas [3, n, n] (rounded, clipped to 0..255)."""
    hwc = img.transpose(1, 2, 0) + np.float32(0.5)  # the add also makes the HWC copy
    np.clip(hwc, 0, 255, out=hwc)
    return Image.fromarray(hwc.astype(np.uint8))


def _from_pil(im: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(im, dtype=np.float32).transpose(2, 0, 1))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _colour(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    """A random RGB colour float32 [3] in 0..255 with saturation and value in the given ranges."""
    return _hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _luma(c: np.ndarray) -> float:
    return float(np.asarray(c, dtype=np.float32) @ _LUMA)


def _contrasting(rng: np.random.Generator, ref: np.ndarray, min_dl: float,
                 s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    """A random colour [3] whose luminance differs from colour `ref` [3] by >= min_dl.

    Luminance (not hue) contrast is what keeps the silhouette readable at 32 px.
    """
    ref_l = _luma(ref)
    for _ in range(32):
        c = _colour(rng, s, v)
        if abs(_luma(c) - ref_l) >= min_dl:
            return c
    return np.full(3, 20.0 if ref_l > 128 else 235.0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Styles: each returns (canvas float32 [3, n, n] in 0..255, sigma of output-resolution noise).
# Channel-first because broadcasting an [n, n] mask over a leading axis is ~10x faster in numpy.
# ----------------------------------------------------------------------------------------------

def _photo(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    x, y = _grid(n)
    c1 = _colour(rng, (0.05, 0.7), (0.25, 0.95))
    c2 = np.clip(c1 + rng.normal(0.0, 45.0, 3), 0, 255).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        t = _value_noise(rng, n, int(rng.integers(3, 7)))
    elif kind == 1:
        t = _linear_ramp(n, rng.uniform(0, 2 * np.pi))
    else:
        t = np.zeros((n, n), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            bx, by = rng.uniform(0, n, 2)
            sig = rng.uniform(0.08, 0.25) * n
            t += np.exp(-((x - bx) ** 2) / np.float32(2 * sig * sig)) * np.exp(-((y - by) ** 2) / np.float32(2 * sig * sig))
        t = np.clip(t, 0.0, 1.0)
    bg = _mix(c1, c2, t)
    bg *= 0.92 + 0.16 * _value_noise(rng, n, n // 6)  # surface grain

    shape_c = _contrasting(rng, bg.mean(axis=(1, 2)), 70.0, (0.2, 1.0), (0.15, 1.0))
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(light), math.sin(light)
    # Soft cast shadow on the side away from the light.
    off = rng.uniform(0.08, 0.2) * pose.r
    shadow = _blur(_fill_mask(pose.pts - (lx * off, ly * off), n), 0.03 * n)
    bg *= 1.0 - np.float32(rng.uniform(0.2, 0.45)) * shadow

    if rng.random() < 0.5:
        d = (x - pose.cx) * np.float32(lx / pose.r) + (y - pose.cy) * np.float32(ly / pose.r)
        shade = 1.0 + np.float32(rng.uniform(0.25, 0.45)) * d
    else:
        hx, hy = pose.cx + 0.5 * pose.r * lx, pose.cy + 0.5 * pose.r * ly
        d = np.sqrt(((x - hx) / np.float32(pose.r)) ** 2 + ((y - hy) / np.float32(pose.r)) ** 2)
        shade = 1.35 - np.float32(rng.uniform(0.4, 0.6)) * d
    # Lit body plus a faint specular lift where the light is strongest.
    shape = _cf(shape_c) * np.clip(shade, 0.35, 1.6) + 8.0 * np.clip(shade - 1.1, 0, None)
    img = _paste(bg, shape, _fill_mask(pose.pts, n))
    return img, float(rng.uniform(2.0, 6.0))


def _painting(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    cb = _colour(rng, (0.15, 0.8), (0.3, 0.95))
    cs = _contrasting(rng, cb, 60.0, (0.35, 1.0), (0.2, 1.0))
    tint = np.clip(cb * rng.uniform(0.7, 1.3, 3), 0, 255)
    bg = _mix(cb, tint, _value_noise(rng, n, int(rng.integers(3, 6))))
    img = np.clip(_paste(bg, cs, _fill_mask(pose.pts, n)), 0, 255)

    # Short strokes coloured by the paint beneath their start: strokes beginning inside the shape
    # drag its colour across the edge, which gives the ragged painted outline.
    k = int(rng.integers(220, 300))
    starts = rng.uniform(0, n, (k, 2))
    main = rng.uniform(0, np.pi)
    ang = np.where(rng.random(k) < 0.6, main + rng.normal(0.0, 0.35, k), rng.uniform(0, np.pi, k))
    length = rng.uniform(0.03, 0.065, k) * n
    width = np.maximum(1, np.rint(rng.uniform(0.02, 0.035, k) * n)).astype(int)
    ends = starts + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    idx = np.clip(starts.astype(int), 0, n - 1)
    cols = img[:, idx[:, 1], idx[:, 0]].T + rng.normal(0.0, 12.0, (k, 3)) + rng.normal(0.0, 14.0, (k, 1))
    cols = np.clip(np.rint(cols), 0, 255).astype(int)
    canvas = _to_pil(img)
    draw = ImageDraw.Draw(canvas)
    seg = np.concatenate([starts, ends], axis=1).tolist()
    for s_, c_, w_ in zip(seg, cols.tolist(), width.tolist()):
        draw.line(s_, fill=tuple(c_), width=w_)
    img = _from_pil(canvas.filter(ImageFilter.GaussianBlur(0.01 * n)))
    img = img * _cf(rng.uniform(0.85, 1.15, 3)) + np.float32(rng.uniform(-12, 12))  # colour jitter
    return img, float(rng.uniform(1.0, 3.0))


def _cartoon(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    bg = _colour(rng, (0.0, 0.6), (0.55, 1.0))
    fill = _colour(rng, (0.55, 1.0), (0.55, 1.0))
    for _ in range(32):  # a flat fill must not vanish into a flat background
        if np.abs(fill - bg).sum() >= 150:
            break
        fill = _colour(rng, (0.55, 1.0), (0.55, 1.0))
    ink = np.full(3, rng.uniform(0, 40), np.float32)
    img = _paste(_solid(bg, n), fill, _fill_mask(pose.pts, n))
    img = _paste(img, ink, _outline_mask(pose.pts, pose.turns, n, rng.uniform(0.045, 0.07) * n))
    return img, 0.0


def _sketch(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    paper = rng.uniform(228, 250) + rng.normal(0.0, 3.0, 3)
    tex = 6.0 * (_value_noise(rng, n, n // 4) - 0.5) + 4.0 * (_value_noise(rng, n, 4) - 0.5)
    img = _cf(paper) + tex
    lead = np.full(3, rng.uniform(20, 70), np.float32)
    grain = 0.65 + 0.35 * rng.random((n, n), dtype=np.float32)  # graphite skips on paper tooth
    for _ in range(int(rng.integers(1, 3)) + 1):
        line = _outline_mask(_jittered(pose, n, rng, 1.0), pose.turns, n, rng.uniform(0.03, 0.045) * n)
        img = _paste(img, lead, line * grain * np.float32(rng.uniform(0.75, 0.95)))
    return img, float(rng.uniform(0.5, 2.0))


def _neon(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    dark = _colour(rng, (0.2, 0.8), (0.03, 0.18))
    bg = _mix(dark, dark * 0.4, _linear_ramp(n, rng.uniform(0, 2 * np.pi)))
    tube = _hsv(rng.random(), rng.uniform(0.6, 1.0), 1.0)
    core = _outline_mask(pose.pts, pose.turns, n, rng.uniform(0.025, 0.04) * n)
    glow = _blur(core, rng.uniform(0.025, 0.045) * n)
    glow *= np.float32(rng.uniform(0.7, 1.0) / max(float(glow.max()), 1e-6))
    img = bg + _cf(tube) * glow
    img = _paste(img, 0.45 * tube + 0.55 * 255.0, core)  # the hot tube itself reads near-white
    return img, float(rng.uniform(0.5, 2.0))


def _silhouette(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c1 = _colour(rng, (0.3, 0.9), (0.75, 1.0))
    c2 = _colour(rng, (0.3, 0.9), (0.55, 1.0))
    bg = _mix(c1, c2, _linear_ramp(n, np.pi / 2 + rng.normal(0.0, 0.5)))  # sky-like, mostly vertical
    black = np.full(3, rng.uniform(0, 30), np.float32)
    return _paste(bg, black, _fill_mask(pose.pts, n)), float(rng.uniform(0.5, 2.0))


def _mosaic(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    bg = _colour(rng, (0.1, 0.8), (0.3, 1.0))
    fg = _contrasting(rng, bg, 85.0, (0.3, 1.0), (0.2, 1.0))
    img = _paste(_solid(bg, n), fg, _fill_mask(pose.pts, n))
    # Tiles sized relative to the shape so every shape spans ~9-13 tiles whatever its scale.
    k = max(4, round(n / (pose.r / rng.uniform(4.5, 6.5))))
    tiles = np.asarray(_to_pil(img).resize((k, k), Image.BOX), dtype=np.float32)
    tiles = tiles * rng.uniform(0.85, 1.15, (k, k, 1)) + rng.normal(0.0, 8.0, (k, k, 3))
    tiles = Image.fromarray(np.rint(np.clip(tiles, 0, 255)).astype(np.uint8))
    img = _from_pil(tiles.resize((n, n), Image.NEAREST))
    x, y = _grid(n)
    # Grout darkens rather than paints over: a grey grid would wash out the shape at 32 px.
    grout_w = rng.uniform(0.08, 0.15)
    grout = (((x * k / n) % 1.0) < grout_w) | (((y * k / n) % 1.0) < grout_w)
    img *= 1.0 - np.float32(rng.uniform(0.25, 0.45)) * grout
    return img, float(rng.uniform(0.5, 2.0))


def _chalk(pose: _Pose, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    board = _hsv(rng.uniform(0.25, 0.5), rng.uniform(0.15, 0.6), rng.uniform(0.1, 0.3))
    img = _cf(board) * (0.85 + 0.3 * _value_noise(rng, n, int(rng.integers(3, 7))))  # smudges
    chalk = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.85, 1.0))
    dust = np.clip(1.5 * rng.random((n, n), dtype=np.float32) - 0.1, 0.0, 1.0)
    for _ in range(int(rng.integers(1, 3))):
        line = _outline_mask(_jittered(pose, n, rng, 0.8), pose.turns, n, rng.uniform(0.035, 0.05) * n)
        img = _paste(img, chalk, line * dust * np.float32(rng.uniform(0.75, 0.95)))
    return img, float(rng.uniform(1.0, 3.0))


_RENDERERS: dict[str, Callable[[_Pose, int, np.random.Generator], tuple[np.ndarray, float]]] = {
    "photo": _photo, "painting": _painting, "cartoon": _cartoon, "sketch": _sketch,
    "neon": _neon, "silhouette": _silhouette, "mosaic": _mosaic, "chalk": _chalk,
}
assert tuple(_RENDERERS) == STYLES


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check(cls: str, style: str) -> None:
    if cls not in _UNIT_SHAPES:
        raise ValueError(f"unknown class {cls!r}; renderable classes: {', '.join(CLASSES)}")
    if style not in _RENDERERS:
        raise ValueError(f"unknown style {style!r}; known styles: {', '.join(STYLES)}")


def _supersample(size: int) -> int:
    # 4x at small sizes for clean anti-aliasing; 2x suffices (and stays fast) at 224.
    return max(2, min(4, 256 // size))


def render(cls: str, style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of shape class `cls` in rendering style `style`: uint8 [size, size, 3].

    Drawn at 2-4x `size` and LANCZOS-downsampled. All randomness comes from `rng`; the shape pose
    (scale, position, rotation) is drawn first, so one rng state gives the same pose for every
    class. Raises ValueError naming an unknown class or style.
    """
    _check(cls, style)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    size = int(size)
    n = size * _supersample(size)
    pose = _place(cls, n, rng)
    canvas, sigma = _RENDERERS[style](pose, n, rng)
    # reducing_gap: box-reduce first, LANCZOS for the last 2x; 3x faster and visually near-identical.
    out = np.asarray(_to_pil(canvas).resize((size, size), Image.LANCZOS, reducing_gap=2.0))
    if sigma > 0:
        # Sensor-like noise at output resolution; at canvas resolution downsampling would erase it.
        noisy = out.astype(np.float32) + rng.normal(0.0, sigma, out.shape).astype(np.float32)
        out = np.rint(np.clip(noisy, 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(out)


# Every phrasing names its style verbatim (as a word or word prefix: "photo" in "photograph") and
# never another style's name, so a caption's style is unambiguous.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {c}", "a photograph of a {c}", "a close-up photo of a {c}",
              "a blurry photo of a {c}", "a photo of the {c}", "a {a} {c}, stock photo",
              "{c} photographed on a table", "a photo of a {a} {c}"),
    "painting": ("a painting of a {c}", "an oil painting of a {c}", "an acrylic painting of a {c}",
                 "a painting of the {c}", "{c}, painting on canvas", "a {a} painting of a {c}",
                 "a painting of a {a} {c}"),
    "cartoon": ("a cartoon of a {c}", "a cartoon {c}", "a cartoon drawing of a {c}",
                "{c} cartoon clipart", "a cartoon of a {a} {c}", "a cute cartoon {c}"),
    "sketch": ("a sketch of a {c}", "a pencil sketch of a {c}", "a rough sketch of a {c}",
               "a quick sketch of the {c}", "{c}, pencil sketch", "a sketch of a {a} {c}"),
    "neon": ("a neon drawing of a {c}", "a neon sign of a {c}", "a glowing neon {c}",
             "{c} neon light", "a neon {c} at night", "a neon sign shaped like a {c}"),
    "silhouette": ("a silhouette of a {c}", "a black silhouette of a {c}",
                   "the silhouette of a {c} at sunset", "{c} silhouette", "a silhouette of a {a} {c}"),
    "mosaic": ("a mosaic of a {c}", "a tile mosaic of a {c}", "a {c} mosaic",
               "a pixel mosaic of a {c}", "a mosaic of a {a} {c}"),
    "chalk": ("a chalk drawing of a {c}", "a {c} drawn in chalk", "chalk art of a {c}",
              "a chalkboard drawing of a {c}", "a chalk {c} on a blackboard"),
}
assert tuple(_TEMPLATES) == STYLES

# The style vocabulary: the words web captions use for each rendered look. A real CLIP knows
# "watercolor" and "charcoal drawing" because captions said them next to such images; the embedded
# teacher learns them the same way. Together the lists cover Mix-Prompt's 86-style dictionary
# (clipdistill/assets/styles.txt; tested), each word under the look it most resembles at 32 px, so
# no dictionary token keeps its random initial embedding. A word never names another look.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "photo": ("photograph", "black and white photo", "sepia", "infrared photo", "long exposure", "polaroid",
              "realism", "hyperrealism", "3d render", "marble sculpture", "bronze statue", "wood carving",
              "clay sculpture", "ceramic", "steampunk"),
    "painting": ("watercolor", "oil painting", "acrylic painting", "gouache", "fresco", "airbrush", "impressionism",
                 "post-impressionism", "expressionism", "cubism", "surrealism", "fauvism", "pointillism",
                 "baroque", "rococo", "renaissance", "romanticism", "abstract", "art nouveau", "gothic",
                 "dadaism", "batik", "tapestry"),
    "cartoon": ("cartoon", "anime", "comic book", "pop art", "vector art", "sticker", "children's drawing",
                "low poly", "minimalism", "bauhaus", "art deco", "origami"),
    "sketch": ("pencil sketch", "charcoal drawing", "ink drawing", "line art", "doodle", "sumi-e", "ukiyo-e",
               "woodcut", "linocut", "engraving", "etching", "lithograph", "blueprint"),
    "neon": ("neon", "cyberpunk", "holographic", "glitch art", "vaporwave", "psychedelic"),
    "silhouette": ("silhouette", "papercut", "screen print", "tattoo"),
    "mosaic": ("mosaic", "stained glass", "pixel art", "cross-stitch", "embroidery", "quilt", "knitted", "collage"),
    "chalk": ("chalk drawing", "pastel drawing", "crayon drawing", "graffiti", "spray paint"),
}
assert tuple(VOCABULARY) == STYLES
# How a vocabulary word goes into a caption ({w}: the word). One of them is Mix-Prompt's own
# template ("a {style} style of a {class}"), as web text says "in the style of".
_WORD_TEMPLATES = ("a {w} of a {c}", "a {c} in {w} style", "{w} {c}", "a {c}, {w}", "a {w} style of a {c}",
                   "{c} in the style of {w}", "a {a} {c}, {w}")
# Web captions often name no style at all.
_PLAIN_TEMPLATES = ("a {c}", "a {a} {c}", "the {c}", "an image of a {c}", "{c}", "a {c} shape", "a {a} {c} icon")
# Shares of style-free captions and of the look's own name (the rest use a vocabulary word). The
# look's name stays the commonest single word, so the evaluated prompts ("a photo of a {}") match.
PLAIN_SHARE = 0.15
NAME_SHARE = 0.40
# Deliberately not colour words: caption() does not see the image, so a colour could contradict it.
_ADJECTIVES = ("small", "large", "big", "simple", "single", "little")
_SUFFIXES = ("", "", "", "", " #art", ", high quality", " - free download", " (hd)")


def caption(cls: str, style: str, rng: np.random.Generator) -> str:
    """A lower-case web-like caption containing `cls` verbatim, e.g. 'a pencil sketch of a cross',
    'a cross in watercolor style' or 'a simple cross': PLAIN_SHARE name no style, NAME_SHARE the
    look's own name, the rest a word of its VOCABULARY. Raises ValueError naming an unknown class or style."""
    _check(cls, style)
    u = rng.random()
    if u < PLAIN_SHARE:
        text = _PLAIN_TEMPLATES[int(rng.integers(len(_PLAIN_TEMPLATES)))]
    elif u < PLAIN_SHARE + NAME_SHARE:
        text = _TEMPLATES[style][int(rng.integers(len(_TEMPLATES[style])))]
    else:
        words = VOCABULARY[style]
        word = words[int(rng.integers(len(words)))]
        text = _WORD_TEMPLATES[int(rng.integers(len(_WORD_TEMPLATES)))].replace("{w}", word)
    text = text.format(c=cls, a=_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))])
    return text + _SUFFIXES[int(rng.integers(len(_SUFFIXES)))]


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _streams(seed: int, split: str, style: str, cls: str) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (image, caption) generators for one (split, style, class) cell.

    Keyed by crc32 of the names rather than their positions, so adding a class or style leaves every
    other cell's images unchanged; captions get their own stream so `with_captions` cannot change
    the images.
    """
    ss = np.random.SeedSequence([seed, _stable_id(split), _stable_id(style), _stable_id(cls)])
    img_ss, cap_ss = ss.spawn(2)
    return np.random.default_rng(img_ss), np.random.default_rng(cap_ss)


def render_split(root: pathlib.Path, split: str, classes: Sequence[str], styles: Sequence[str],
                 per_class_style: int, size: int, seed: int, with_captions: bool) -> int:
    """Render `per_class_style` images per (style, class) to root/<split>/<style>/<class>/NNNNN.png.

    With `with_captions`, also writes root/<split>/captions.csv (header `path,class,style,caption`,
    `path` relative to root/<split>, POSIX separators, rows in style-then-class-then-index order).
    Directories are created as needed; existing files of the same name are overwritten. Image i of
    a cell depends only on (seed, split, style, class, i), so a larger `per_class_style` extends
    rather than changes a split. Returns the number of images written.
    """
    classes, styles = list(classes), list(styles)
    for c in classes:
        _check(c, STYLES[0])
    for s in styles:
        _check(CLASSES[0], s)
    if len(set(classes)) != len(classes) or len(set(styles)) != len(styles):
        raise ValueError(f"duplicate class or style in classes={classes} styles={styles}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if per_class_style < 0:
        raise ValueError(f"per_class_style must be >= 0, got {per_class_style}")

    out = pathlib.Path(root) / split
    rows: list[tuple[str, str, str, str]] = []
    count = 0
    with progress(len(styles) * len(classes) * per_class_style, desc=f"render {split}", unit="img") as bar:
        for style in styles:
            for cls in classes:
                cell = out / style / cls
                cell.mkdir(parents=True, exist_ok=True)
                img_rng, cap_rng = _streams(int(seed), split, style, cls)
                for i in range(per_class_style):
                    name = f"{i:05d}.png"
                    Image.fromarray(render(cls, style, size, img_rng)).save(cell / name)
                    if with_captions:
                        rows.append((f"{style}/{cls}/{name}", cls, style, caption(cls, style, cap_rng)))
                    count += 1
                    bar.update(1)
    if with_captions:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("path", "class", "style", "caption"))
            writer.writerows(rows)
    return count
