"""Find the shapes in a picture of the shapes world, with no learned weights.

1. Every pixel takes the nearest color of the palette (the shape colors plus the gray background); pixels
   farther than ``threshold`` from every palette color (antialiased edges, noise) are ignored.
2. The object pixels (any shape color) are split into 8-connected components. A component is one object of
   its majority color when that color holds at least 60% of its pixels, or when it is a known shape as a
   whole made of solid single-color chunks (a two-tone object: a yellow square whose edge came out orange;
   counting its parts would invent objects). Its single-color parts are the objects instead when it is no
   known shape as a whole while some of them are (objects of different colors that touch, or a shape with a
   fringe of another color), and when it is a speckle of many colors.
   Components (and parts) smaller than ``min_area`` (a fraction of the image) are specks and dropped.
3. Each component is described by simple features of its bounding box — fill ratio (circle pi/4 ~ 0.785,
   square 1.0, triangle 0.5), corner fill (pixels in the four corner patches of 1/5 of the side: square
   1.0, circle 0.14, triangle 0.375) and the ratio of the top half's pixels to the bottom half's (1/3 for
   an upward triangle, 1 for the others) — and
   takes the shape whose ideal features are nearest, or ``None`` if none is near enough.
   Opt-in shapes (``analyze(..., shapes=SHAPES + ("star",))``, see ``ldm.data.shapes.EXTRA_SHAPES``): a blob
   is a star when it is concave: its solidity (pixels / area of their convex hull; star ~0.5, the convex
   shapes ~1) is below ``_STAR_MAX_SOLIDITY`` and its corner patches are nearly empty. By default the analyzer
   knows only the default world's shapes and its verdicts are those it always gave.
4. Its size is "small" or "large" by the bounding box's half-extent (see ``ldm.data.shapes.SIZE_RADIUS``).

Centers are fractions of the image side (x to the right, y downwards), like scene coordinates.
On rendered scenes it is exact from 48 px up (tested at 64); at 32 px about 1 image in 60 has a small shape
(6 px across) it cannot name.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image

from ldm.data.shapes import BACKGROUND, COLORS, SHAPES, SIZE_RADIUS, check_shapes

__all__ = ["Detection", "analyze", "to_rgb_array", "shape_features", "classify_shape", "solidity"]

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

# Ideal (fill, corner fill, width ratio) of each shape, from its geometry.
_PROTOTYPES = {
    "circle": (math.pi / 4, 0.137, 1.0),
    "square": (1.0, 1.0, 1.0),
    "triangle": (0.5, 0.375, 1.0 / 3.0),
}
_MAX_FEATURE_DISTANCE = 0.4  # beyond this from every prototype the blob is no known shape
_MAX_ASPECT = 1.6             # our shapes have square bounding boxes; allow some slack for generated images
_SIZE_THRESHOLD = math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"])
_MIN_MAJORITY = 0.6           # share of a component's pixels its color must hold for it to be one object
_STAR_MAX_SOLIDITY = 0.75     # star ~0.47 (inner radius 0.4), circle / square / triangle ~1: the midpoint
_STAR_MAX_CORNER_FILL = 0.3   # a star's box corners are nearly empty (0-0.19 rendered; triangle 0.375, square 1)


@dataclass(frozen=True)
class Detection:
    """One found object. ``shape`` is None when the blob matches no known shape."""
    shape: str | None
    color: str
    size: str
    center: tuple[float, float]  # (x, y), fractions of width / height
    area: float                  # fraction of the image's pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive
    fill: float


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """PIL image, uint8 array [H, W, 3], or float tensor [3, H, W] in [-1, 1] -> uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor image must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return arr.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"array image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return image
    raise TypeError(f"cannot analyze {type(image).__name__}; pass a PIL image, uint8 array or [3,H,W] tensor")


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-connected components of a boolean mask, as (ys, xs) index arrays."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append((np.asarray(ys), np.asarray(xs)))
    return out


def shape_features(blob: np.ndarray) -> tuple[float, float, float]:
    """(fill ratio, corner fill, top-half / bottom-half pixel ratio) of a boolean blob cropped to its bbox."""
    h, w = blob.shape
    fill = float(blob.mean())
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    corners = [blob[:ch, :cw], blob[:ch, -cw:], blob[-ch:, :cw], blob[-ch:, -cw:]]
    corner_fill = float(np.mean([c.mean() for c in corners]))
    top, bottom = blob[: h // 2].sum(), blob[h - h // 2:].sum()
    ratio = float(top / bottom) if bottom else 1.0
    return fill, corner_fill, min(ratio, 1.5)


def solidity(blob: np.ndarray) -> float:
    """Pixels of a boolean blob over the area of the convex hull of its pixel squares (1 for a convex shape)."""
    ys, xs = np.nonzero(blob)
    if not len(ys):
        return 0.0
    points = set()
    for y in np.unique(ys):  # a row's leftmost and rightmost pixel squares hold all its hull corners
        row = xs[ys == y]
        for x in (row.min(), row.max() + 1):
            points.update({(int(x), int(y)), (int(x), int(y) + 1)})
    pts = sorted(points)

    def half(seq):  # Andrew's monotone chain
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    area = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))
    return float(len(ys) / area) if area else 1.0


def classify_shape(blob: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """Nearest shape prototype of a boolean blob cropped to its bbox, or None when nothing is near. A
    ``"star"`` among ``shapes`` is recognised by its concavity first (see the module docstring)."""
    h, w = blob.shape
    if max(h, w) / min(h, w) > _MAX_ASPECT:
        return None
    feats = shape_features(blob)
    if "star" in shapes and feats[1] < _STAR_MAX_CORNER_FILL and solidity(blob) < _STAR_MAX_SOLIDITY:
        return "star"
    best, best_dist = None, _MAX_FEATURE_DISTANCE
    for name, proto in _PROTOTYPES.items():
        if name not in shapes:
            continue
        dist = math.dist(feats, proto)
        if dist < best_dist:
            best, best_dist = name, dist
    return best


def analyze(image: ImageLike, threshold: float = 60.0, min_area: float = 0.003,
            shapes: tuple[str, ...] = SHAPES) -> list[Detection]:
    """Detected objects of a shapes-world picture, largest first.

    ``threshold``: RGB distance within which a pixel counts as a palette color; ``min_area``: smallest
    component kept, as a fraction of the image (0.003 is 12 pixels at 64x64; a small shape covers > 80);
    ``shapes``: the shapes it can name (default: the default world's; add ``"star"`` to find stars too).
    """
    if shapes is not SHAPES:
        shapes = check_shapes(shapes)
    rgb = to_rgb_array(image).astype(np.float32)
    h, w, _ = rgb.shape
    names = list(COLORS)
    palette = np.asarray([COLORS[n] for n in names] + [BACKGROUND], dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    valid = dist.min(-1) < threshold
    min_pixels = max(1, int(min_area * h * w))
    labels = np.where(valid, nearest, len(names))  # len(names): the background or no palette color

    def detection(ys: np.ndarray, xs: np.ndarray, color: str) -> Detection:
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        blob = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
        blob[ys - y0, xs - x0] = True
        half_extent = max(blob.shape[0] / h, blob.shape[1] / w) / 2
        return Detection(shape=classify_shape(blob, shapes), color=color,
                         size="large" if half_extent > _SIZE_THRESHOLD else "small",
                         center=(float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)),
                         area=len(ys) / (h * w), bbox=(x0, y0, x1, y1), fill=float(blob.mean()))

    found = []
    for ys, xs in _components(labels < len(names)):
        if len(ys) < min_pixels:
            continue
        own = labels[ys, xs]
        counts = np.bincount(own, minlength=len(names))
        whole = detection(ys, xs, names[int(counts.argmax())])
        if np.count_nonzero(counts) == 1:
            found.append(whole)
            continue
        parts = []
        for ci in np.nonzero(counts)[0]:
            mask = np.zeros((h, w), dtype=bool)
            mask[ys[own == ci], xs[own == ci]] = True
            parts += [detection(py, px, names[ci]) for py, px in _components(mask) if len(py) >= min_pixels]
        if whole.shape is None and any(p.shape is not None for p in parts):
            found += parts  # objects of different colors that touch, or a shape with a fringe of another color
        elif counts.max() >= _MIN_MAJORITY * len(ys):
            found.append(whole)  # one color holds most of it
        elif whole.shape is not None and sum(p.area for p in parts) >= _MIN_MAJORITY * whole.area:
            found.append(whole)  # a known shape made of solid chunks of two colors (a two-tone object)
        else:
            found += parts  # a speckle of many colors: only its solid single-color parts count
    return sorted(found, key=lambda d: -d.area)
