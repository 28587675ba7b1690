"""Captions of the shapes world worded many ways: paraphrases of a prompt spec.

:func:`ldm.data.shapes.caption_spec` words a spec with a few fixed patterns ("two red circles above a blue
square", "3 yellow squares", "a picture of a red circle and a blue square"). A model trained on those alone
follows prompts worded that way and little else. :func:`paraphrase_spec` words the same spec with other
word orders and words: digits or number words, "a single", "colored red" / "in red" / "red-colored", "big",
plural forms ("there are ..."), frames ("... on a gray background", "a drawing of ..."), relations as "left of"
without "to the", "on top of", "beneath", "underneath", "higher than", "next to" / "beside", relations told
from the reference ("a square with two circles above it", "above a square are two circles")::

    >>> text, said = paraphrase_spec(spec, random.Random(3))

``said`` is the spec the text states: the input spec, except that a left/right relation worded "next to"
names no side, so its type is :data:`ldm.data.shapes.NEXT_TO` (either side holds). ``ShapesDataset(...,
paraphrase=p)`` words a share ``p`` of its captions this way (default 0: the captions stay as they were).

Every choice is made from a fixed number of draws taken up front, so two specs that differ only in a word
(the relation inverted, colors or shapes exchanged) get the same wording from the same ``rng`` state: the
hard negatives of ``recipes/shapes_demo/pretrain_text_tower.py``.
"""
from __future__ import annotations

import random
from typing import Any

from ldm.data.shapes import COUNT_WORDS, INVERSE_RELATION, NEXT_TO, validate_spec

__all__ = ["paraphrase_spec", "text_tokens", "PARAPHRASE_DRAWS", "MAX_TOKENS"]

PARAPHRASE_DRAWS = 24  # random numbers drawn per paraphrase, whatever the spec
MAX_TOKENS = 20        # the demo text tower's context (shapes_demo.yaml: max_length)

_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
# relation -> ways to say "<subject> ... <reference>"; all lists of one relation's pair have the same length
_RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right of", "on the right side of"),
    "above": ("above", "on top of", "higher than", "over"),
    "below": ("below", "beneath", "underneath", "under"),
}
_NEXT_TO_PHRASES = ("next to", "beside", "by the side of", "alongside")
_FRAMES = ("{}", "{}", "{}", "{} on a gray background", "{} against a gray background", "{} on gray",
           "a drawing of {}", "a picture showing {}", "a gray picture with {}", "{}, plain gray background")
_PAIR_LINKS = ("{} and {}", "{} with {}", "{} plus {}", "both {} and {}", "{} together with {}", "{}, {}",
               "{} as well as {}", "{} and also {}")


def _pick(u: float, options: tuple) -> Any:
    return options[min(int(u * len(options)), len(options) - 1)]


def _noun_phrase(group: dict[str, Any], u: list[float]) -> str:
    """One group worded from 5 draws ``u``: "a single red circle", "3 circles colored blue", "two big squares"."""
    n, shape, color, size = group["count"], group["shape"], group.get("color"), group.get("size")
    noun = shape if n == 1 else shape + "s"
    size_word = _pick(u[0], _SIZE_WORDS[size]) if size else None
    style = int(u[1] * 4)  # where the color goes: before the noun, "colored red", "in red", "red-colored"
    if color is None:
        style = 0
    adjectives = [w for w in (size_word, color if style == 0 else None,
                              f"{color}-colored" if style == 3 else None) if w]
    core = " ".join(adjectives + [noun])
    if style == 1:
        core += f" colored {color}"
    elif style == 2:
        core += f" in {color}"
    if n == 1:
        det = _pick(u[2], ("a", "a", "a", "one", "a single", "1", "just one"))
        if det == "a" and core[0] in "aeiou":
            det = "an"
    else:
        det = _pick(u[2], (COUNT_WORDS[n], str(n), COUNT_WORDS[n], str(n), f"exactly {COUNT_WORDS[n]}",
                           f"a group of {COUNT_WORDS[n]}"))
    return f"{det} {core}"


def _are(group: dict[str, Any], phrase: str) -> str:
    return "is" if group["count"] == 1 and not phrase.startswith("a group") else "are"


def text_tokens(text: str) -> int:
    """The demo text tower's token count of ``text`` (its BPE keeps each word of this world whole but
    "triangles"; a hyphen and a comma are tokens of their own), with the start and end tokens."""
    words = text.replace("-", " - ").replace(",", " , ").split()
    return len(words) + words.count("triangles") + 2


def paraphrase_spec(spec: dict[str, Any], rng: random.Random, max_tokens: int = MAX_TOKENS
                    ) -> tuple[str, dict[str, Any]]:
    """``(text, said)``: ``spec`` worded at random (module docstring) and the spec the text states. A wording
    longer than ``max_tokens`` (the demo tower reads 20) loses its frame, then its less usual words."""
    validate_spec(spec)
    u = [rng.random() for _ in range(PARAPHRASE_DRAWS)]
    text, said = _wording(spec, u)
    if text_tokens(text) > max_tokens:
        text, said = _wording(spec, u, framed=False)
    if text_tokens(text) > max_tokens:  # plain colors, "a" / number words, the subject first
        for i in (1, 2, 6, 7, 13, 14):
            u[i] = 0.0
        text, said = _wording(spec, u, framed=False)
    return text, said


def _wording(spec: dict[str, Any], u: list[float], framed: bool = True) -> tuple[str, dict[str, Any]]:
    groups = spec["objects"]
    phrases = [_noun_phrase(g, u[5 * i:5 * i + 5]) for i, g in enumerate(groups)]
    said = {k: v for k, v in spec.items() if k not in ("objects", "relation")}
    said["objects"] = [dict(g) for g in groups]
    said["relation"] = dict(spec["relation"]) if spec.get("relation") else None
    rel = spec.get("relation")
    if rel is not None:
        subj_g, ref_g = groups[rel["subject"]], groups[rel["reference"]]
        subj, ref, relation = phrases[rel["subject"]], phrases[rel["reference"]], rel["type"]
        if relation in ("left of", "right of") and u[10] < 0.2:  # "next to": the side is not said
            relation = NEXT_TO
            said["relation"]["type"] = NEXT_TO
        if relation != NEXT_TO and u[11] < 0.3:  # told from the other object: "a square below two circles"
            subj_g, ref_g, subj, ref, relation = ref_g, subj_g, ref, subj, INVERSE_RELATION[relation]
        words = _pick(u[12], _NEXT_TO_PHRASES if relation == NEXT_TO else _RELATION_PHRASES[relation])
        order = int(u[13] * 5)
        if order == 0:
            body = f"{subj} {words} {ref}"
        elif order == 1:
            body = f"{subj} {_are(subj_g, subj)} {words} {ref}"
        elif order == 2:  # "a square with two circles above it"
            body = f"{ref} with {subj} {words} it"
        elif order == 3:  # "above a square, two circles"
            body = f"{words} {ref}, {subj}"
        else:  # "above a square are two circles"
            body = f"{words} {ref} {_are(subj_g, subj)} {subj}"
    elif len(phrases) == 2:
        first, second = (phrases[1], phrases[0]) if u[10] < 0.5 else (phrases[0], phrases[1])
        body = _pick(u[11], _PAIR_LINKS).format(first, second)
    else:
        body = phrases[0]
    if not framed:
        return body, said
    if rel is None and u[15] < 0.2:  # "there is a red circle", "there are 3 squares"
        return f"there {_are(groups[0], phrases[0])} {body}", said
    # a sentence that starts with its relation ("above a square are two circles") takes no frame before it
    frames = _FRAMES if rel is None or order < 3 else tuple(f for f in _FRAMES if f.startswith("{}"))
    return _pick(u[16], frames).format(body), said
