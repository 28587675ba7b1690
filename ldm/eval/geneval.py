"""Prompt faithfulness on the shapes world, in the spirit of GenEval (Ghosh et al., 2023).

Prompts are worded from specs (see :mod:`ldm.data.shapes`), so we know what each picture must show; the
deterministic :func:`ldm.eval.analyzer.analyze` finds what it does show and :func:`score` compares.

Categories (as GenEval, with our shapes for its COCO classes):

==================  ===============================  ===========================================================
category            example prompt                   correct when
==================  ===============================  ===========================================================
single_object       "a triangle"                     at least one triangle
two_objects         "a circle and a square"          at least one of each
counting            "three circles"                  exactly three circles
colors              "a purple square"                at least one purple square
position            "a circle to the left of a       both found and some circle's centroid is left of some
                    square"                          square's centroid by more than ``POSITION_MARGIN``
color_attribution   "a red circle and a blue square" a red circle and a blue square are both found
==================  ===============================  ===========================================================

Colors and sizes are checked only when the spec says them; blobs of no known shape are ignored. A relation of
type ``"next_to"`` (``ldm.data.shapes.NEXT_TO``: "a circle next to a square") holds on either side, left or right.
Prompts can also come from a file (:func:`read_prompts_file`: JSON lines ``{"category", "prompt", "spec"}``) or be
paraphrases of the held-out specs (:func:`make_paraphrased_prompts`, ``ldm.data.paraphrase``).
Eval prompts use the held-out seed stream ``random.Random(f"eval/{seed}/{category}/{i}")``, never the
``train/...`` stream of :class:`ldm.data.shapes.ShapesDataset`.
The overall score is the mean of the category accuracies (not of all images), like GenEval's.

A new shape (opt-in, see ``ldm.data.shapes.EXTRA_SHAPES``): ``make_eval_prompts(n, seed, focus="star")`` makes
prompts of every category that all name a star (from their own stream ``eval/{seed}/star/{category}/{i}``),
and ``evaluate(..., shapes=SHAPES + ("star",), focus="star")`` scores them with an analyzer that knows stars and
reports ``focus_rate``: the share of images in which a star (of the asked color, where one is asked) is found.
"""
from __future__ import annotations

import json
import logging
import random
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image

from ldm.data.shapes import COLORS, RELATIONS, SHAPES, caption_spec, check_shapes, relation_holds, validate_spec
from ldm.eval.analyzer import Detection, analyze

__all__ = ["CATEGORIES", "POSITION_MARGIN", "FAILURE_CAUSES", "EvalPrompt", "make_eval_prompts", "make_spec",
           "make_paraphrased_prompts", "read_prompts_file", "score", "failure_cause", "focus_found", "evaluate",
           "format_report"]

log = logging.getLogger(__name__)

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
POSITION_MARGIN = 0.05  # fraction of the image side between centroids for a relation to hold

GenerateFn = Callable[[list, list], Sequence[Image.Image]]


class EvalPrompt(NamedTuple):
    category: str
    prompt: str
    spec: dict


def _group(shape: str, color: str | None = None, count: int = 1) -> dict[str, Any]:
    return {"shape": shape, "color": color, "size": None, "count": count}


def make_spec(category: str, rng: random.Random, index: int = 0, focus: str | None = None) -> dict[str, Any]:
    """A random spec of ``category``; ``index`` cycles counts (1..4) and relations so they stay balanced.
    ``focus``: a shape every spec names (the first object; in position specs the subject or the reference)."""
    if focus is None:
        shape_a, shape_b = rng.sample(SHAPES, 2)
    else:
        shape_a, shape_b = focus, rng.choice([s for s in SHAPES if s != focus])
    color_a, color_b = rng.sample(list(COLORS), 2)
    if category == "single_object":
        objects, relation = [_group(shape_a)], None
    elif category == "two_objects":
        objects, relation = [_group(shape_a), _group(shape_b)], None
    elif category == "counting":
        objects, relation = [_group(shape_a, count=1 + index % 4)], None
    elif category == "colors":
        objects, relation = [_group(shape_a, color_a)], None
    elif category == "position":
        objects = [_group(shape_a), _group(shape_b)]
        relation = {"type": RELATIONS[index % len(RELATIONS)], "subject": 0, "reference": 1}
        if focus is not None and index // len(RELATIONS) % 2:  # the new shape as the reference half the time
            objects.reverse()
    elif category == "color_attribution":
        objects, relation = [_group(shape_a, color_a), _group(shape_b, color_b)], None
    else:
        raise ValueError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    return {"category": category, "objects": objects, "relation": relation}


def make_eval_prompts(n_per_category: int, seed: int = 0, focus: str | None = None) -> list[EvalPrompt]:
    """``n_per_category`` prompts of each category from the held-out stream, as (category, prompt, spec);
    with ``focus`` (an opt-in shape such as ``"star"``), prompts that all name it, from a stream of their own."""
    if not isinstance(n_per_category, int) or n_per_category < 1:
        raise ValueError(f"n_per_category must be a positive int, got {n_per_category!r}")
    if focus is not None:
        check_shapes(SHAPES + (focus,) if focus not in SHAPES else SHAPES, focus)
    prompts = []
    for category in CATEGORIES:
        for i in range(n_per_category):
            stream = f"eval/{seed}/{category}/{i}" if focus is None else f"eval/{seed}/{focus}/{category}/{i}"
            rng = random.Random(stream)
            spec = make_spec(category, rng, i, focus)
            prompts.append(EvalPrompt(category, caption_spec(spec, rng), spec))
    return prompts


def make_paraphrased_prompts(n_per_category: int, seed: int = 0) -> list[EvalPrompt]:
    """``n_per_category`` held-out specs of each category worded by :func:`ldm.data.paraphrase.paraphrase_spec`
    (streams ``eval/paraphrase/{seed}/{category}/{i}``, apart from :func:`make_eval_prompts`'); each spec is the
    one its prompt states (a left/right relation worded "next to" becomes ``"next_to"``)."""
    from ldm.data.paraphrase import paraphrase_spec

    if not isinstance(n_per_category, int) or n_per_category < 1:
        raise ValueError(f"n_per_category must be a positive int, got {n_per_category!r}")
    prompts = []
    for category in CATEGORIES:
        for i in range(n_per_category):
            rng = random.Random(f"eval/paraphrase/{seed}/{category}/{i}")
            text, said = paraphrase_spec(make_spec(category, rng, i), rng)
            prompts.append(EvalPrompt(category, text, said))
    return prompts


def read_prompts_file(path: str) -> list[EvalPrompt]:
    """Eval prompts from a JSON-lines file, one ``{"category": str, "prompt": str, "spec": {...}}`` per line
    (blank lines skipped; ``spec`` as :func:`make_spec` makes it, relation types those of ``ldm.data.shapes``
    or ``"next_to"``; the line's category is the spec's, so "counting" asks for exact counts). A bad line raises
    ValueError naming the file, the line and the problem."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(row, dict) or not {"category", "prompt", "spec"} <= set(row):
                raise ValueError(f'{where}: needs an object with "category", "prompt" and "spec"')
            category, prompt, spec = row["category"], row["prompt"], row["spec"]
            if not isinstance(category, str) or not category.strip():
                raise ValueError(f'{where}: "category" must be a non-empty string, got {category!r}')
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
            if not isinstance(spec, dict):
                raise ValueError(f'{where}: "spec" must be an object with "objects" and "relation"')
            try:
                validate_spec(spec)
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from None
            prompts.append(EvalPrompt(category, prompt, dict(spec, category=category)))
    if not prompts:
        raise ValueError(f"{path}: no prompts; write one JSON object per line")
    return prompts


def _matches(det: Detection, group: dict[str, Any]) -> bool:
    return (det.shape == group["shape"]
            and group.get("color") in (None, det.color)
            and group.get("size") in (None, det.size))


def _relation_found(relation: dict[str, Any], groups: list, detections: Sequence[Detection]) -> bool:
    """Some reference has ``count`` subjects standing in the relation to it."""
    subject, reference = groups[relation["subject"]], groups[relation["reference"]]
    subjects = [d for d in detections if _matches(d, subject)]
    for ref in (d for d in detections if _matches(d, reference)):
        ok = [s for s in subjects
              if s is not ref and relation_holds(relation["type"], s.center, ref.center, POSITION_MARGIN)]
        if len(ok) >= subject["count"]:
            return True
    return False


FAILURE_CAUSES = ("missing object", "extra objects", "wrong attribute", "wrong position")


def failure_cause(spec: dict[str, Any], detections: Sequence[Detection]) -> str | None:
    """Why ``detections`` do not show what ``spec`` asks, or None when they do (the rules of the module
    docstring). The first failing check names the cause, one of :data:`FAILURE_CAUSES`:

    - "missing object": fewer objects of an asked shape than asked, whatever their colors;
    - "extra objects": a counting spec (``category == "counting"``) with more objects of the shape than asked;
    - "wrong attribute": enough objects of the shape, but too few of the asked color (or size);
    - "wrong position": every object found, but none stands in the asked relation.
    """
    validate_spec(spec)
    groups = spec["objects"]
    exact = spec.get("category") == "counting"
    causes = []
    for group in groups:
        same_shape = [d for d in detections if d.shape == group["shape"]]
        if len(same_shape) < group["count"]:
            return "missing object"
        if exact and len(same_shape) > group["count"]:
            causes.append("extra objects")
        elif sum(_matches(d, group) for d in same_shape) < group["count"]:
            causes.append("wrong attribute")
    if causes:
        return causes[0]
    relation = spec.get("relation")
    if relation is not None and not _relation_found(relation, groups, detections):
        return "wrong position"
    return None


def score(spec: dict[str, Any], detections: Sequence[Detection]) -> bool:
    """Whether ``detections`` show what ``spec`` asks (rules in the module docstring). A spec with
    ``category == "counting"`` needs exactly ``count`` objects of the shape, all with the asked attributes."""
    return failure_cause(spec, detections) is None


def _describe(detections: Sequence[Detection]) -> list[str]:
    """What the analyzer found, compactly: "red circle small (0.31, 0.42)"; "?" for a blob of no shape."""
    return [f"{d.color} {d.shape or '?'} {d.size} ({d.center[0]:.2f}, {d.center[1]:.2f})" for d in detections]


def focus_found(spec: dict[str, Any], focus: str, detections: Sequence[Detection]) -> bool:
    """Some ``focus`` shape is found, of the color the spec asks for it (if it asks one)."""
    colors = {g.get("color") for g in spec["objects"] if g["shape"] == focus}
    return any(d.shape == focus and (None in colors or d.color in colors) for d in detections)


def evaluate(generate_fn: GenerateFn, prompts: Sequence[EvalPrompt], images_per_prompt: int = 4,
             seed: int = 0, shapes: Sequence[str] = SHAPES, focus: str | None = None) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt and score them.

    ``generate_fn(prompts: list[str], seeds: list[int]) -> list[PIL.Image]`` is called once per prompt;
    image ``k`` of prompt ``p`` gets seed ``seed + p * images_per_prompt + k``. The report holds
    ``categories`` ({name: {accuracy, correct, total, causes}}; ``causes`` counts the failed images by
    :func:`failure_cause`), ``overall`` (mean of category accuracies), ``num_images``, ``num_prompts``,
    ``images_per_prompt`` and per-image ``records`` (with the ``cause`` and what the analyzer ``found``).
    ``shapes``: the shapes the analyzer can name; ``focus``: a shape every prompt names (see the module
    docstring), whose share of images that show it is ``focus_rate`` (and ``focus_found`` per record).
    """
    shapes = tuple(shapes)
    if shapes != SHAPES or focus is not None:
        shapes = check_shapes(shapes, focus)
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")
    if not prompts:
        raise ValueError("no prompts to evaluate; make some with make_eval_prompts(n_per_category)")
    records = []
    for p, (category, prompt, spec) in enumerate(prompts):
        seeds = [seed + p * images_per_prompt + k for k in range(images_per_prompt)]
        images = list(generate_fn([prompt] * images_per_prompt, seeds))
        if len(images) != images_per_prompt:
            raise ValueError(f"generate_fn returned {len(images)} images for {images_per_prompt} seeds; "
                             "it must return one image per seed")
        for s, image in zip(seeds, images):
            detections = analyze(image, shapes=shapes) if shapes != SHAPES else analyze(image)
            cause = failure_cause(spec, detections)
            records.append({"category": category, "prompt": prompt, "seed": s, "correct": cause is None,
                            "cause": cause, "found": _describe(detections)})
            if focus is not None:
                records[-1]["focus_found"] = focus_found(spec, focus, detections)
        log.info("[%d/%d] %s: %r", p + 1, len(prompts), category, prompt)
    report = _summarize(records, len(prompts), images_per_prompt)
    if focus is not None:
        report["focus"] = focus
        report["focus_rate"] = sum(r["focus_found"] for r in records) / len(records)
        for name, c in report["categories"].items():
            c["focus_rate"] = sum(r["focus_found"] for r in records if r["category"] == name) / c["total"]
    return report


def _summarize(records: list[dict], num_prompts: int, images_per_prompt: int) -> dict[str, Any]:
    categories = {}
    for name in dict.fromkeys(r["category"] for r in records):  # in order of first appearance
        rows = [r for r in records if r["category"] == name]
        correct = sum(r["correct"] for r in rows)
        causes = {c: sum(r.get("cause") == c for r in rows) for c in FAILURE_CAUSES}
        categories[name] = {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
                            "causes": {c: n for c, n in causes.items() if n}}
    overall = sum(c["accuracy"] for c in categories.values()) / len(categories)
    return {"categories": categories, "overall": overall, "num_images": len(records),
            "num_prompts": num_prompts, "images_per_prompt": images_per_prompt, "records": records}


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of an :func:`evaluate` report."""
    lines = ["| category | accuracy | correct / images |", "|---|---:|---:|"]
    for name, c in report["categories"].items():
        lines.append(f"| {name} | {100 * c['accuracy']:.1f}% | {c['correct']} / {c['total']} |")
    lines.append(f"| **overall** (mean of categories) | **{100 * report['overall']:.1f}%** "
                 f"| {report['num_images']} images |")
    if "focus_rate" in report:
        found = sum(r["focus_found"] for r in report["records"])
        lines += ["", f"Images that show a {report['focus']} (of the asked color, where one is asked): "
                      f"**{100 * report['focus_rate']:.1f}%** ({found} / {report['num_images']}); by category: "
                  + ", ".join(f"{n} {100 * c['focus_rate']:.1f}%" for n, c in report["categories"].items())]
    lines += ["", "Failed images by cause (see ``failure_cause``):", "",
              "| category | " + " | ".join(FAILURE_CAUSES) + " |", "|---|" + "---:|" * len(FAILURE_CAUSES)]
    for name, c in report["categories"].items():
        causes = c.get("causes", {})
        lines.append(f"| {name} | " + " | ".join(str(causes.get(k, 0)) for k in FAILURE_CAUSES) + " |")
    return "\n".join(lines) + "\n"
