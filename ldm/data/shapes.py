"""The captioned-shapes world: the project's own small text-to-image data.

Flat colored circles, squares and triangles on a plain mid-gray background, each picture with a caption
that says what is in it ("two small red circles above a blue square", "3 yellow squares", ...).
A small model trained on it must follow prompts; :mod:`ldm.eval.geneval` then checks its pictures.

Coordinates are fractions of the image side (x to the right, y downwards), so a scene renders at any size.
Every shape of half-extent ``r`` fills the axis-aligned box ``center +- r``: a circle of radius ``r``,
a square of side ``2r``, a triangle pointing up with base ``2r`` and height ``2r``.

Prompt specs (:func:`scene_to_prompt_spec`) are plain JSON-able dicts::

    {"objects": [{"shape": "circle", "color": "red", "size": "small", "count": 2},
                 {"shape": "square", "color": "blue", "size": None, "count": 1}],
     "relation": {"type": "above", "subject": 0, "reference": 1}}   # or None

``color``/``size`` ``None`` means "not said". :func:`caption_spec` words a spec, :func:`spec_to_scene`
samples a scene that satisfies it (the inverse), and ``caption(scene, rng)`` = ``caption_spec`` of the scene's
spec with a few details randomly left out.

Seed streams: training items come from ``random.Random(f"train/{seed}/{index}")``; held-out items come from
streams named ``eval/...``: ``f"eval/{seed}/{index}"`` (``split="eval"``: reconstruction checks) and
``f"eval/{seed}/{category}/{i}"`` (GenEval prompts, :mod:`ldm.eval.geneval`). They never share a draw, but the
world is small, so a held-out prompt's *text* can equal a training caption: the split holds out scenes and
seeds, not word combinations.

Opt-in shapes (:data:`EXTRA_SHAPES`): a five-point star is part of the world only where asked for, so the
default world, its captions and its random streams stay as they are. ``ShapesDataset(..., shapes=SHAPES +
("star",))`` draws it among the others; ``focus="star"`` makes every scene show one (the pictures a LoRA of the
new shape learns from), drawn from their own stream ``random.Random(f"{split}/{seed}/{focus}/{index}")``.

Run ``python -m ldm.data.shapes --out DIR --num N --shard-size K`` to write webdataset shards.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "COLORS", "SHAPES", "SIZES", "RELATIONS", "NEXT_TO", "INVERSE_RELATION", "COLOR_DROP", "SIZE_DROP", "KINDS",
    "COUNT_WORDS", "BACKGROUND", "SIZE_RADIUS", "EXTRA_SHAPES", "ALL_SHAPES", "STAR_INNER", "check_shapes",
    "ShapeObject", "Scene", "sample_scene", "render", "caption", "caption_spec",
    "scene_to_prompt_spec", "spec_to_scene", "spec_kind", "validate_spec", "relation_holds", "scene_rng",
    "image_to_tensor", "ShapesDataset", "write_shards", "main",
]

log = logging.getLogger(__name__)

BACKGROUND = (128, 128, 128)
# Far apart from each other (>= 105 in RGB distance) and from the gray background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 230, 30),
    "orange": (250, 130, 0),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Opt-in shapes (not in the default world; see the module docstring). A five-point star, its inner vertices at
# STAR_INNER of the outer radius: concave (solidity ~0.47), so the analyzer tells it from the convex shapes.
EXTRA_SHAPES = ("star",)
ALL_SHAPES = SHAPES + EXTRA_SHAPES
STAR_INNER = 0.4
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.10, "large": 0.17}  # half-extent, fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
NEXT_TO = "next_to"  # a spec's relation type for "next to": left of or right of, either side (specs only)
KINDS = ("single", "relation", "counting", "color_attribution")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

MARGIN = 0.04        # free border around the image, fraction of the side
GAP = 0.05           # minimum free space between two objects' boxes
RELATION_GAP = 0.12  # minimum centroid offset along the relation's axis in generated scenes
_SUPERSAMPLE = 4
_PLACEMENT_TRIES = 400


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape; ``center`` is (x, y) in fractions of the image side."""
    shape: str
    color: str
    size: str
    center: tuple[float, float]

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]


@dataclass
class Scene:
    """Objects in drawing order. For ``kind == "relation"`` the objects before the last one (one group of
    identical objects) stand ``relation`` the last one, e.g. objects[:-1] are "above" objects[-1]."""
    kind: str
    objects: list[ShapeObject] = field(default_factory=list)
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objects = [ShapeObject(o["shape"], o["color"], o["size"], tuple(o["center"])) for o in d["objects"]]
        return cls(kind=d["kind"], objects=objects, relation=d.get("relation"))


def scene_rng(seed: int, index: int, split: str = "train") -> random.Random:
    """The random stream of item ``index``: independent of workers and of other items; ``split`` is
    ``"train"`` or ``"eval"`` (held out)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return random.Random(f"{split}/{int(seed)}/{int(index)}")


# ----------------------------------------------------------------------------------------------- placement
def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (xa, ya, ra), (xb, yb, rb) = a, b
    need = ra + rb + GAP
    return abs(xa - xb) >= need or abs(ya - yb) >= need


def relation_holds(relation: str, subject: tuple[float, float], reference: tuple[float, float],
                   margin: float) -> bool:
    """Whether ``subject`` (x, y) is ``relation`` ``reference`` by more than ``margin`` (y grows downwards)."""
    dx, dy = subject[0] - reference[0], subject[1] - reference[1]
    if relation == "left of":
        return dx < -margin
    if relation == "right of":
        return dx > margin
    if relation == "above":
        return dy < -margin
    if relation == "below":
        return dy > margin
    if relation == NEXT_TO:
        return abs(dx) > margin
    raise ValueError(f"unknown relation {relation!r}; use one of {', '.join(RELATIONS)}")


def _place(radii: Sequence[float], rng: random.Random, relation: str | None = None) -> list[tuple[float, float]]:
    """Random non-overlapping centers inside the margin; with ``relation`` every object but the last one
    stands in that relation to the last one. Raises RuntimeError when the objects do not fit."""
    for _ in range(_PLACEMENT_TRIES):
        placed: list[tuple[float, float, float]] = []
        for r in radii:
            lo, hi = MARGIN + r, 1.0 - MARGIN - r
            cand = (rng.uniform(lo, hi), rng.uniform(lo, hi), r)
            if all(_boxes_apart(cand, p) for p in placed):
                placed.append(cand)
            else:
                break
        if len(placed) < len(radii):
            continue
        ref = placed[-1][:2]
        if relation is None or all(relation_holds(relation, p[:2], ref, RELATION_GAP) for p in placed[:-1]):
            return [(round(x, 4), round(y, 4)) for x, y, _ in placed]
    raise RuntimeError(f"cannot place {len(radii)} objects without overlap; use fewer or smaller objects")


# ----------------------------------------------------------------------------------------------- scenes
def _two_distinct(rng: random.Random, pool: Sequence[str]) -> tuple[str, str]:
    a, b = rng.sample(list(pool), 2)
    return a, b


def _scene_from_groups(kind: str, groups: list[tuple[str, str, str, int]], rng: random.Random,
                       relation: str | None = None) -> Scene:
    """Build a scene from (shape, color, size, count) groups; with a relation, groups[0] relates to groups[1].
    A large group that does not fit is made small (the whole group, so identical objects stay identical)."""
    groups = list(groups)
    while True:
        flat = [(shape, color, size) for shape, color, size, n in groups for _ in range(n)]
        try:
            centers = _place([SIZE_RADIUS[size] for _, _, size in flat], rng, relation)
            break
        except RuntimeError:
            large = [i for i, g in enumerate(groups) if g[2] == "large"]
            if not large:
                raise
            shape, color, _, n = groups[large[0]]
            groups[large[0]] = (shape, color, "small", n)
    objects = [ShapeObject(shape, color, size, center) for (shape, color, size), center in zip(flat, centers)]
    return Scene(kind=kind, objects=objects, relation=relation)


def check_shapes(shapes: Sequence[str], focus: str | None = None) -> tuple[str, ...]:
    """``shapes`` as a tuple of at least two distinct known shapes (``ALL_SHAPES``) that holds ``focus``;
    a one-line ValueError otherwise."""
    shapes = tuple(shapes)
    bad = [s for s in shapes if s not in ALL_SHAPES]
    if bad:
        raise ValueError(f"unknown shape {bad[0]!r} in shapes; use any of {', '.join(ALL_SHAPES)}")
    if len(set(shapes)) != len(shapes) or len(shapes) < 2:
        raise ValueError(f"shapes={list(shapes)} must be at least two distinct shapes")
    if focus is not None and focus not in shapes:
        raise ValueError(f"focus shape {focus!r} is not among shapes {list(shapes)}; add it, e.g. "
                         f"shapes={list(SHAPES) + [focus]}")
    return shapes


def _check_sizes(sizes: Sequence[str]) -> tuple[str, ...]:
    sizes = tuple(sizes)
    if not sizes or any(z not in SIZES for z in sizes):
        raise ValueError(f"sizes={list(sizes)} must be a non-empty list of {', '.join(SIZES)}")
    return sizes


def _two_with(rng: random.Random, pool: Sequence[str], focus: str | None) -> tuple[str, str]:
    """Two distinct shapes of ``pool``; with ``focus``, one of them is ``focus`` (first or second at random)."""
    if focus is None:
        return _two_distinct(rng, pool)
    other = rng.choice([s for s in pool if s != focus])
    return (focus, other) if rng.random() < 0.5 else (other, focus)


def sample_scene(rng: random.Random, kind: str | None = None, shapes: Sequence[str] = SHAPES,
                 focus: str | None = None, sizes: Sequence[str] = SIZES) -> Scene:
    """A random scene of ``kind`` (one of KINDS; ``None`` picks one uniformly):

    - ``single``: one object;
    - ``relation``: one object (or a pair of identical ones) left of / right of / above / below another
      object of a different shape;
    - ``counting``: 1..4 identical objects;
    - ``color_attribution``: two objects of different shapes and different colors.

    ``shapes``: the shapes to draw from (default: the default world's, with its exact random draws);
    ``focus``: a shape of ``shapes`` that every scene shows (the single/counting shape, one of the two others);
    ``sizes``: the sizes to draw from (a large group that does not fit is still made small).
    """
    if kind is None:
        kind = rng.choice(KINDS)
    if shapes is not SHAPES or focus is not None:
        shapes = check_shapes(shapes, focus)
    if sizes is not SIZES:
        sizes = _check_sizes(sizes)
    colors, pick_size = list(COLORS), lambda: rng.choice(sizes)
    pick_shape = (lambda: focus) if focus is not None else (lambda: rng.choice(shapes))
    if kind == "single":
        return _scene_from_groups(kind, [(pick_shape(), rng.choice(colors), pick_size(), 1)], rng)
    if kind == "counting":
        n = rng.randint(1, MAX_COUNT)
        return _scene_from_groups(kind, [(pick_shape(), rng.choice(colors), pick_size(), n)], rng)
    if kind == "color_attribution":
        (sa, sb), (ca, cb) = _two_with(rng, shapes, focus), _two_distinct(rng, colors)
        return _scene_from_groups(kind, [(sa, ca, pick_size(), 1), (sb, cb, pick_size(), 1)], rng)
    if kind == "relation":
        (sa, sb), relation = _two_with(rng, shapes, focus), rng.choice(RELATIONS)
        n = 2 if rng.random() < 0.25 else 1
        groups = [(sa, rng.choice(colors), pick_size(), n), (sb, rng.choice(colors), pick_size(), 1)]
        return _scene_from_groups(kind, groups, rng, relation)
    raise ValueError(f"unknown scene kind {kind!r}; use one of {', '.join(KINDS)} or None")


# ----------------------------------------------------------------------------------------------- specs
def scene_to_prompt_spec(scene: Scene) -> dict[str, Any]:
    """The full prompt spec of a scene: identical objects (shape, color, size) grouped with a count."""
    groups: list[dict[str, Any]] = []
    for obj in scene.objects:
        for g in groups:
            if (g["shape"], g["color"], g["size"]) == (obj.shape, obj.color, obj.size):
                g["count"] += 1
                break
        else:
            groups.append({"shape": obj.shape, "color": obj.color, "size": obj.size, "count": 1})
    relation = None
    if scene.relation is not None:
        if len(groups) != 2:
            raise ValueError(f"a relation scene needs one subject group and one reference, got {len(groups)} groups")
        relation = {"type": scene.relation, "subject": 0, "reference": 1}
    return {"objects": groups, "relation": relation}


def spec_kind(spec: dict[str, Any]) -> str:
    """The scene kind a spec describes."""
    objects = spec["objects"]
    if spec.get("relation"):
        return "relation"
    if len(objects) == 2:
        return "color_attribution"
    if len(objects) == 1:
        return "single" if objects[0]["count"] == 1 else "counting"
    raise ValueError(f"a spec has 1 or 2 object groups, got {len(objects)}")


def validate_spec(spec: dict[str, Any]) -> None:
    """Raise ValueError (one line, naming the field) for a spec outside the shapes world."""
    objects = spec.get("objects")
    if not isinstance(objects, list) or not 1 <= len(objects) <= 2:
        raise ValueError("spec['objects'] must be a list of 1 or 2 groups")
    for i, g in enumerate(objects):
        if g.get("shape") not in ALL_SHAPES:
            raise ValueError(f"spec['objects'][{i}]['shape'] = {g.get('shape')!r}; use one of {', '.join(ALL_SHAPES)}")
        if g.get("color") is not None and g["color"] not in COLORS:
            raise ValueError(f"spec['objects'][{i}]['color'] = {g['color']!r}; use one of {', '.join(COLORS)} or None")
        if g.get("size") is not None and g["size"] not in SIZES:
            raise ValueError(f"spec['objects'][{i}]['size'] = {g['size']!r}; use small, large or None")
        if not isinstance(g.get("count"), int) or not 1 <= g["count"] <= MAX_COUNT:
            raise ValueError(f"spec['objects'][{i}]['count'] = {g.get('count')!r}; use an int in 1..{MAX_COUNT}")
    rel = spec.get("relation")
    if rel is not None:
        if rel.get("type") not in RELATIONS + (NEXT_TO,):
            raise ValueError(f"spec['relation']['type'] = {rel.get('type')!r}; "
                             f"use one of {', '.join(RELATIONS + (NEXT_TO,))}")
        if len(objects) != 2 or (rel.get("subject"), rel.get("reference")) not in ((0, 1), (1, 0)):
            raise ValueError("spec['relation'] needs two object groups and subject/reference indices 0 and 1")


def spec_to_scene(spec: dict[str, Any], rng: random.Random) -> Scene:
    """A random scene satisfying ``spec`` (unsaid colors and sizes are drawn at random)."""
    validate_spec(spec)
    objects, rel = spec["objects"], spec.get("relation")
    if rel is not None:
        objects = [objects[rel["subject"]], objects[rel["reference"]]]
    groups = [(g["shape"], g.get("color") or rng.choice(list(COLORS)), g.get("size") or rng.choice(SIZES),
               g["count"]) for g in objects]
    return _scene_from_groups(spec_kind(spec), groups, rng, rel["type"] if rel else None)


# ----------------------------------------------------------------------------------------------- captions
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    NEXT_TO: ("next to",),
}
INVERSE_RELATION = {  # the relation seen from the other object
    "left of": "right of", "right of": "left of", "above": "below", "below": "above", NEXT_TO: NEXT_TO}
_FRAMES = ("{}", "{}", "{}", "a picture of {}", "an image of {}", "{} on a gray background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(group: dict[str, Any], rng: random.Random, digits: bool) -> str:
    """'a small red circle', 'one circle', '3 yellow squares', 'two large triangles'."""
    words = [w for w in (group.get("size"), group.get("color")) if w]
    n = group["count"]
    noun = group["shape"] if n == 1 else group["shape"] + "s"
    phrase = " ".join(words + [noun])
    if n == 1 and not digits and rng.random() < 0.8:
        return f"{_article(phrase)} {phrase}"
    return f"{n if digits else COUNT_WORDS[n]} {phrase}"


def caption_spec(spec: dict[str, Any], rng: random.Random) -> str:
    """Word a prompt spec; the phrasing varies with ``rng`` (deterministic given its state)."""
    validate_spec(spec)
    digits = rng.random() < 0.3
    phrases = [_noun_phrase(g, rng, digits) for g in spec["objects"]]
    rel = spec.get("relation")
    if rel is not None:
        subj, ref = phrases[rel["subject"]], phrases[rel["reference"]]
        relation = rel["type"]
        if rng.random() < 0.3:  # mirrored: "a square below two circles"
            subj, ref, relation = ref, subj, INVERSE_RELATION[relation]
            verb = "is"
        else:
            verb = "is" if spec["objects"][rel["subject"]]["count"] == 1 else "are"
        link = rng.choice(_RELATION_WORDS[relation])
        if rng.random() < 0.25:
            link = f"{verb} {link}"
        return f"{subj} {link} {ref}"
    if len(phrases) == 2:
        body = f"{phrases[0]} {rng.choice(('and', 'and', 'next to', 'with'))} {phrases[1]}"
    else:
        body = phrases[0]
    return rng.choice(_FRAMES).format(body)


SIZE_DROP = 0.5    # default share of captions that leave the sizes out
COLOR_DROP = 0.15  # default share of captions that leave the colors out


def caption(scene: Scene, rng: random.Random, color_drop: float = COLOR_DROP, size_drop: float = SIZE_DROP,
            paraphrase: float = 0.0) -> str:
    """A natural caption of ``scene``; sizes are left out with probability ``size_drop`` and colors with
    ``color_drop`` (so color-free prompts such as "three circles" are in the training distribution too).
    With probability ``paraphrase`` it is worded by :func:`ldm.data.paraphrase.paraphrase_spec` instead (other
    word orders and words; 0 draws nothing more from ``rng``, so the captions stay as they were)."""
    spec = scene_to_prompt_spec(scene)
    drop_size, drop_color = rng.random() < size_drop, rng.random() < color_drop
    for g in spec["objects"]:
        if drop_size:
            g["size"] = None
        if drop_color:
            g["color"] = None
    if paraphrase > 0 and rng.random() < paraphrase:
        from ldm.data.paraphrase import paraphrase_spec  # it imports this module

        return paraphrase_spec(spec, rng)[0]
    return caption_spec(spec, rng)


# ----------------------------------------------------------------------------------------------- render
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, one up; outer radius so that it is 2r wide, its box centered on (cx, cy)
        outer = r / math.sin(math.radians(72))
        pts = [(math.sin(math.radians(36 * k)) * (outer if k % 2 == 0 else STAR_INNER * outer),
                -math.cos(math.radians(36 * k)) * (outer if k % 2 == 0 else STAR_INNER * outer)) for k in range(10)]
        dy = (min(y for _, y in pts) + max(y for _, y in pts)) / 2
        return [(cx + x, cy + y - dy) for x, y in pts]
    return None


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` (>= 32). Drawn 4x larger and box-downsampled:
    edges are antialiased, object interiors keep their exact palette color."""
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"render size must be an int >= 32, got {size!r}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        if obj.shape not in ALL_SHAPES or obj.color not in COLORS:
            raise ValueError(f"cannot draw {obj.color} {obj.shape}; shapes: {ALL_SHAPES}, colors: {tuple(COLORS)}")
        cx, cy, r = obj.center[0] * big, obj.center[1] * big, obj.radius * big
        fill = COLORS[obj.color]
        poly = _polygon(obj.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((size, size), Image.BOX)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------- dataset
class ShapesDataset(Dataset):
    """Map-style dataset of captioned shapes: item ``i`` depends only on (split, seed, i), whatever the worker.

    Returns ``{"image": float [3, size, size] in [-1, 1], "caption": str}`` (with ``micro_conditioning``
    also SDXL's ``original_size_as_tuple`` = ``target_size_as_tuple`` = (size, size), ``crop_coords_top_left``
    = (0, 0)). No random flips here: a flip
    would contradict left/right captions. ``split="eval"`` reads the held-out seed stream.
    ``shapes`` (default ``SHAPES``), ``focus`` (a shape every scene shows, drawn from its own stream) and
    ``sizes`` (default ``SIZES``): see :func:`sample_scene` and the module docstring.
    """

    def __init__(self, num_samples: int, size: int = 64, seed: int = 0, kinds: Sequence[str] | None = None,
                 split: str = "train", color_drop: float = COLOR_DROP, micro_conditioning: bool = False,
                 paraphrase: float = 0.0, shapes: Sequence[str] | None = None, focus: str | None = None,
                 sizes: Sequence[str] | None = None):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(size, int) or size < 32:
            raise ValueError(f"size must be an int >= 32, got {size!r}")
        kinds = tuple(kinds) if kinds else KINDS
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown scene kind {bad[0]!r} in kinds; use any of {', '.join(KINDS)}")
        if not 0.0 <= color_drop <= 1.0:
            raise ValueError(f"color_drop must be a probability in [0, 1], got {color_drop!r}")
        if not 0.0 <= paraphrase <= 1.0:
            raise ValueError(f"paraphrase must be a probability in [0, 1], got {paraphrase!r}")
        self.paraphrase = float(paraphrase)
        scene_rng(seed, 0, split)  # validates split
        self.num_samples, self.size, self.seed, self.kinds, self.split = num_samples, size, seed, kinds, split
        self.color_drop = float(color_drop)
        self.micro_conditioning = bool(micro_conditioning)
        self.shapes = SHAPES if shapes is None and focus is None else check_shapes(
            shapes if shapes is not None else SHAPES + ((focus,) if focus not in SHAPES else ()), focus)
        self.focus = focus
        self.sizes = SIZES if sizes is None else _check_sizes(sizes)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[Scene, str]:
        """The scene and caption of item ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for ShapesDataset of {self.num_samples} samples")
        if self.focus is None:
            rng = scene_rng(self.seed, index, self.split)
        else:  # a stream of its own: the focus pictures share no draw with the default world's
            rng = random.Random(f"{self.split}/{int(self.seed)}/{self.focus}/{int(index)}")
        scene = sample_scene(rng, rng.choice(self.kinds), self.shapes, self.focus, self.sizes)
        return scene, caption(scene, rng, color_drop=self.color_drop, paraphrase=self.paraphrase)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, text = self.scene(index)
        sample = {"image": image_to_tensor(render(scene, self.size)), "caption": text}
        if self.micro_conditioning:  # rendered at its size: no crop (see ldm.data.transforms.ImageTransform.sample)
            size = torch.tensor((self.size, self.size))
            sample.update({"original_size_as_tuple": size, "crop_coords_top_left": torch.zeros(2, dtype=torch.long),
                           "target_size_as_tuple": size.clone()})
        return sample


# ----------------------------------------------------------------------------------------------- shards
def write_shards(out: str | os.PathLike, num: int, shard_size: int = 1000, size: int = 64, seed: int = 0,
                 kinds: Sequence[str] | None = None, split: str = "train") -> list[str]:
    """Write ``num`` samples as webdataset tar shards ``out/shapes-000000.tar``, ... with keys
    ``__key__``, ``png``, ``txt`` and ``json`` (the scene). Returns the shard paths."""
    import webdataset as wds

    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    dataset = ShapesDataset(num, size=size, seed=seed, kinds=kinds, split=split)
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(os.fspath(out), "shapes-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(num):
            scene, text = dataset.scene(i)
            buf = io.BytesIO()
            render(scene, size).save(buf, format="PNG")
            sink.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "txt": text.encode("utf-8"),
                        "json": json.dumps(scene.to_dict()).encode("utf-8")})
    shards = [pattern % k for k in range((num + shard_size - 1) // shard_size)]
    log.info("wrote %d samples in %d shards to %s", num, len(shards), out)
    return shards


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by the shapes and eval command lines)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m ldm.data.shapes",
                                     description="Write captioned-shapes webdataset shards.")
    parser.add_argument("--out", required=True, help="output folder for shapes-NNNNNN.tar")
    parser.add_argument("--num", type=positive_int, required=True, help="number of samples")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="seed stream: train, or the held-out eval stream")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=None, help="scene kinds (default: all)")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error(f"--size {args.size} is too small; use 32 or more")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; give a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return write_shards(args.out, args.num, args.shard_size, args.size, args.seed, args.kinds, args.split)


if __name__ == "__main__":
    main()
