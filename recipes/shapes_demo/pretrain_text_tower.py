"""Pretrain a text tower contrastively (CLIP-style) on the shapes world, with relation-inverted hard negatives.

    python recipes/shapes_demo/pretrain_text_tower.py --steps 1500 --out text_tower.safetensors \
        [--init MODEL.safetensors]

The demo model v4's jointly trained text tower codes the relation words 5x weaker than the shapes (``python -m
ldm.eval relations``: relative output change 0.11 for an inverted relation, 0.55 for exchanged shapes), so its
UNet has nothing to place objects by. Here the same tower (``ldm-small-text``, 20 tokens; ``--init`` starts from
a model file's ``cond_stage_model.*``) learns against a small image encoder with a symmetric InfoNCE loss, and
every picture's caption with the relation inverted is an extra negative for it: a tower that codes "left of" and
"right of" alike cannot tell them apart. The caption's end-of-text token, which the causal tower lets see every
word, is the text embedding. Writes the tower's weights (``cond_stage_model.*`` names, fp32) and reports, on
held-out pictures, how often the true caption beats the inverted one, and ``text_change`` (ldm/eval/probe.py).

``--color-swaps``: color-attribution pictures get a hard negative too, their caption with the two objects'
colors exchanged ("a red circle and a blue square" against "a blue circle and a red square"), and the report
adds how often held-out color-attribution pictures score their caption above the swapped one. A tower trained
on relation negatives alone codes a color exchange about half as strongly as the jointly trained one did.

``--shape-swaps``: relation pictures get a second hard negative, their caption with the two objects' shapes
exchanged ("a red circle below a blue triangle" against "a red triangle below a blue circle"): the demo model v6
kept the colors bound and let the shapes trade places. ``--paraphrase P``: a share P of the captions and their
negatives (worded alike) come from ``ldm.data.paraphrase`` (other words and word orders); a negative that reads
like its caption (a left/right relation worded "next to" names no side) is left out.

``--twice-negatives``: pictures of two different shapes (relation and color-attribution scenes) get their caption
with the first shape named twice as a hard negative ("a circle and a square" against "a circle and a circle"), and
color-attribution captions go color-free 40% of the time: a v7 candidate trained on a tower without it drew "a
circle and a square" as two circles. The report adds ``twice_accuracy``.

``--count-negatives``: single-object and counting pictures get their caption with the count one higher or lower
("three red circles" against "four red circles"; one object against two, four against three), worded alike: models
draw "three circles" as four. The tower learns it (97.7% held out) but the pictures' counting did not change
(recipes/shapes_demo/README.md, "Eighth session"). The report adds ``count_accuracy``. ``--color-moves``: relation
pictures whose caption names colors also get it with the two objects' colors exchanged ("a red circle above a
blue square" against "a blue circle above a red square"), as ``--color-swaps`` does for color-attribution ones.

``--anchor W``: the hard negatives train the end-of-text token only, but the UNet reads every token's output; W x
the mean squared change of every caption token's output against the ``--init`` tower's (relative to the latter's
mean square) keeps those where the UNet, trained on the init tower, expects them. Needs ``--init``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.paraphrase import paraphrase_spec
from ldm.data.shapes import (INVERSE_RELATION, MAX_COUNT, ShapesDataset, caption_spec, image_to_tensor, render,
                             scene_to_prompt_spec)
from ldm.eval.probe import text_change
from ldm.io import read_state_dict, save_checkpoint
from ldm.models.text_encoder import OpenCLIPTextEncoder
from ldm.training.lr import WarmupCosine

log = logging.getLogger("pretrain_text_tower")
KINDS = ["single", "relation", "relation", "relation", "counting", "color_attribution"]


class ImageEncoder(nn.Module):
    """64x64 RGB -> ``dim``: four stride-2 convs and a linear head (positions kept: no global pooling)."""

    def __init__(self, dim: int = 128, width: int = 32):
        super().__init__()
        layers, ch = [], 3
        for mult in (1, 2, 4, 4):
            layers += [nn.Conv2d(ch, width * mult, 3, stride=2, padding=1), nn.GroupNorm(8, width * mult), nn.SiLU()]
            ch = width * mult
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def text_embeddings(tower: OpenCLIPTextEncoder, captions: Sequence[str],
                    outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The end-of-text token's output for each caption (the causal tower lets it see every word); with
    ``outputs`` also every token's output, (captions, tokens, width)."""
    tokens = tower.tokenize(list(captions))
    out = tower.encode_tokens(tokens)
    eot = out[torch.arange(len(captions)), tokens.argmax(dim=-1)]
    return (eot, out) if outputs else eot


def color_swapped_captions(spec: dict, seed: int) -> tuple[str, str]:
    """The caption of a two-object spec with colors, and the same caption with the two objects' colors
    exchanged (same wording otherwise)."""
    objects = [dict(g) for g in spec["objects"]]
    swapped = [dict(g) for g in objects]
    swapped[0]["color"], swapped[1]["color"] = objects[1]["color"], objects[0]["color"]
    relation = spec.get("relation")
    return (caption_spec({"objects": objects, "relation": relation}, random.Random(seed)),
            caption_spec({"objects": swapped, "relation": relation}, random.Random(seed)))


def shape_swapped_captions(spec: dict, seed: int) -> tuple[str, str]:
    """The caption of a two-object spec, and the same caption with the two objects' shapes exchanged (colors,
    sizes, counts and the relation stay where they were; same wording otherwise)."""
    objects = [dict(g) for g in spec["objects"]]
    swapped = [dict(g) for g in objects]
    swapped[0]["shape"], swapped[1]["shape"] = objects[1]["shape"], objects[0]["shape"]
    relation = spec.get("relation")
    return (caption_spec({"objects": objects, "relation": relation}, random.Random(seed)),
            caption_spec({"objects": swapped, "relation": relation}, random.Random(seed)))


def changed_spec(spec: dict, change: str) -> dict:
    """``spec`` with its relation inverted (``change`` "relation"), the two objects' colors or shapes
    exchanged ("colors", "shapes"), the first object's shape drawn twice ("twice": the second object takes the
    first one's shape, its color, size and count kept), or the first group's count one higher or lower ("more",
    "fewer")."""
    objects = [dict(g) for g in spec["objects"]]
    relation = dict(spec["relation"]) if spec.get("relation") else None
    if change == "relation":
        relation["type"] = INVERSE_RELATION[relation["type"]]
    elif change == "twice":
        objects[1]["shape"] = objects[0]["shape"]
    elif change in ("more", "fewer"):
        objects[0]["count"] += 1 if change == "more" else -1
        if not 1 <= objects[0]["count"] <= MAX_COUNT:
            raise ValueError(f"a count of {spec['objects'][0]['count']} has no '{change}' negative in 1..{MAX_COUNT}")
    else:
        key = {"colors": "color", "shapes": "shape"}[change]
        objects[0][key], objects[1][key] = spec["objects"][1][key], spec["objects"][0][key]
    return {"objects": objects, "relation": relation}


def paraphrased_pair(spec: dict, change: str, seed: int) -> tuple[str, str | None]:
    """The paraphrased caption of ``spec`` and of :func:`changed_spec` worded alike (same draws); the second is
    None when both read the same ("next to" names no side, so an inverted left/right is no negative then)."""
    true = paraphrase_spec(spec, random.Random(seed))[0]
    other = paraphrase_spec(changed_spec(spec, change), random.Random(seed))[0]
    return true, (other if other != true else None)


def batch(data: ShapesDataset, indices: Sequence[int], rng: random.Random, color_swaps: bool = False,
          shape_swaps: bool = False, paraphrase: float = 0.0, twice: bool = False, counts: bool = False,
          color_moves: bool = False) -> tuple[torch.Tensor, list, list]:
    """Images, captions, and each image's hard negatives, a dict {change: caption} (empty for most scenes):
    relation scenes the caption with the relation inverted ("relation"; with ``shape_swaps`` also the shapes
    exchanged, "shapes"), with ``color_swaps`` color-attribution scenes the caption with the colors exchanged
    ("colors"). With ``twice``, relation and color-attribution scenes of two different shapes also get the caption
    with the first shape named twice ("twice": "a circle and a square" against "a circle and a circle"), and
    color-attribution captions go color-free 40% of the time, as relation ones do. With ``counts``, single and
    counting scenes get the caption with the count one higher or lower ("count"), and go color-free 40% of the
    time; with ``color_moves``, relation scenes whose caption names colors also get the colors exchanged
    ("colors"). With ``paraphrase`` that share of the captions (and their negatives) are paraphrases."""
    images, captions, negatives = [], [], []
    for i in indices:
        scene, caption = data.scene(i)
        images.append(image_to_tensor(render(scene, data.size)))  # data[i] would draw the scene a second time
        changes = []
        if scene.relation is not None:
            changes = ["relation", "shapes"] if shape_swaps else ["relation"]
        elif color_swaps and scene.kind == "color_attribution":
            changes = ["colors"]
        two_shapes = len({o.shape for o in scene.objects}) == 2
        if twice and two_shapes and (scene.relation is not None or scene.kind == "color_attribution"):
            changes = changes + ["twice"]
        single = scene.kind in ("single", "counting")
        if counts and single:
            changes = ["count"]
        negs = {}
        if changes:
            spec, seed = scene_to_prompt_spec(scene), rng.randrange(1 << 30)
            color_free = (scene.relation is not None or (twice and scene.kind == "color_attribution")
                          or (counts and single))
            if color_free and not rng.random() > 0.4:  # 40% color-free, as the position and two-object prompts
                for g in spec["objects"]:
                    g["color"] = g["size"] = None
            if color_moves and scene.relation is not None and spec["objects"][0]["color"] is not None:
                changes = changes + ["colors"]
            if "count" in changes:
                n = spec["objects"][0]["count"]
                count_change = "more" if n == 1 else "fewer" if n == MAX_COUNT else rng.choice(["more", "fewer"])
            words = rng.random() < paraphrase if paraphrase else False
            for change in changes:
                how = count_change if change == "count" else change
                if words:
                    caption, negs[change] = paraphrased_pair(spec, how, seed)
                else:
                    caption, negs[change] = caption_spec(spec, random.Random(seed)), caption_spec(
                        changed_spec(spec, how), random.Random(seed))
            negs = {k: v for k, v in negs.items() if v is not None and v != caption}
        captions.append(caption)
        negatives.append(negs)
    return torch.stack(images), captions, negatives


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, neg_rows: torch.Tensor,
                     scale: torch.Tensor, pair_weight: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE; image i also scores the inverted captions ``neg`` (the one of row ``neg_rows[j]`` is
    image ``neg_rows[j]``'s hard negative), plus ``pair_weight`` x a logistic loss on each image's true-minus-
    inverted score (one hard negative among a batch of easy ones gets little weight in the softmax alone)."""
    img, txt, neg = F.normalize(img, dim=-1), F.normalize(txt, dim=-1), F.normalize(neg, dim=-1)
    logits = scale * img @ torch.cat([txt, neg]).t()
    target = torch.arange(len(img))
    image_to_text = F.cross_entropy(logits, target)
    text_to_image = F.cross_entropy(logits[:, :len(img)].t(), target)
    loss = (image_to_text + text_to_image) / 2
    if pair_weight and len(neg_rows):
        margin = logits[neg_rows, neg_rows] - logits[neg_rows, len(img) + torch.arange(len(neg_rows))]
        loss = loss + pair_weight * F.softplus(-margin).mean()
    return loss


def anchor_loss(outputs: torch.Tensor, reference: OpenCLIPTextEncoder, captions: Sequence[str]) -> torch.Tensor:
    """Mean squared difference of every token's output (``outputs``) from the ``reference`` tower's on the same
    ``captions``, over the reference outputs' mean square: 0 where nothing moved, 1 for a change as large as the
    outputs themselves."""
    with torch.no_grad():
        target = reference.encode_tokens(reference.tokenize(list(captions)))
    return (outputs - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


@torch.no_grad()
def hard_negative_accuracy(tower: OpenCLIPTextEncoder, images: ImageEncoder, num: int = 128,
                           kind: str = "relation", change: str = "relation", paraphrase: float = 0.0) -> float:
    """Share of ``num`` held-out pictures of ``kind`` whose caption scores above its ``change`` negative (the
    relation inverted, "colors" or "shapes" exchanged, the first shape "twice", the "count" changed by one),
    among those that have one."""
    data = ShapesDataset(num, kinds=[kind], split="eval")
    pics, caps, negs = batch(data, range(num), random.Random(0), color_swaps=True, shape_swaps=True,
                             paraphrase=paraphrase, twice=change == "twice", counts=change == "count")
    rows = [i for i, n in enumerate(negs) if change in n]
    img = F.normalize(images(pics[rows]), dim=-1)
    true = (img * F.normalize(text_embeddings(tower, [caps[i] for i in rows]), dim=-1)).sum(-1)
    swapped = (img * F.normalize(text_embeddings(tower, [negs[i][change] for i in rows]), dim=-1)).sum(-1)
    return (true > swapped).float().mean().item()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pair-weight", type=float, default=1.0,
                   help="weight of the true-vs-inverted caption loss (0: InfoNCE only)")
    p.add_argument("--color-swaps", action="store_true",
                   help="color-attribution pictures' captions with the colors exchanged as hard negatives too")
    p.add_argument("--shape-swaps", action="store_true",
                   help="relation pictures' captions with the two objects' shapes exchanged as hard negatives too")
    p.add_argument("--twice-negatives", action="store_true",
                   help="two-shape pictures' captions with the first shape named twice as hard negatives too")
    p.add_argument("--count-negatives", action="store_true",
                   help="single and counting pictures' captions with the count one higher or lower as hard negatives")
    p.add_argument("--color-moves", action="store_true",
                   help="colored relation pictures' captions with the two objects' colors exchanged as hard negatives")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="weight of keeping every caption token's output near the --init tower's (default 0)")
    p.add_argument("--paraphrase", type=float, default=0.0,
                   help="share of captions (and their negatives) worded by ldm.data.paraphrase (default 0)")
    p.add_argument("--num-train", type=int, default=50000)
    p.add_argument("--init", default=None, help="a model file whose cond_stage_model.* starts the tower")
    p.add_argument("--out", required=True, help="where to write the tower (safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        raise SystemExit(f"--steps {args.steps} must be >= 1 and --batch-size {args.batch_size} >= 2")
    if not 0.0 <= args.paraphrase <= 1.0:
        raise SystemExit(f"--paraphrase {args.paraphrase} must be a share in [0, 1]")
    if args.anchor < 0 or (args.anchor and not args.init):
        raise SystemExit(f"--anchor {args.anchor} needs --init (the tower to stay near) and a weight >= 0")
    torch.manual_seed(args.seed)
    tower = OpenCLIPTextEncoder("ldm-small-text", layer="last", pad="zero", max_length=20, projection=False,
                                freeze=False)
    if args.init:
        state, _ = read_state_dict(args.init)
        prefix = "cond_stage_model."
        own = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise SystemExit(f"--init {args.init} has no cond_stage_model.* tensors: give an LDM model file")
        tower.load_state_dict(own)
    reference = None
    if args.anchor:
        reference = copy.deepcopy(tower).eval().requires_grad_(False)
    images = ImageEncoder(tower.encode(["x"]).shape[-1])
    scale = nn.Parameter(torch.tensor(10.0).log())
    params = list(tower.parameters()) + list(images.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = min(max(1, args.steps // 20), args.steps - 1)  # --steps 1: no warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup_steps=warmup, total_steps=args.steps, final=0.1))
    data = ShapesDataset(args.num_train, kinds=KINDS, seed=args.seed, color_drop=0.4, paraphrase=args.paraphrase)
    rng = random.Random(args.seed)
    tower.train()
    for step in range(1, args.steps + 1):
        pics, caps, negs = batch(data, rng.sample(range(len(data)), args.batch_size), rng, args.color_swaps,
                                 args.shape_swaps, args.paraphrase, args.twice_negatives, args.count_negatives,
                                 args.color_moves)
        rows = torch.tensor([i for i, n in enumerate(negs) for _ in n], dtype=torch.long)
        txt, out = text_embeddings(tower, caps + [c for n in negs for c in n.values()], outputs=True)
        loss = contrastive_loss(images(pics), txt[:len(caps)], txt[len(caps):], rows, scale.exp().clamp(max=100),
                                args.pair_weight)
        if reference is not None:
            loss = loss + args.anchor * anchor_loss(out[:len(caps)], reference, caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            log.info("step %d loss %.4f", step, loss.item())
    tower.eval()
    images.eval()
    report = {"relation_accuracy": hard_negative_accuracy(tower, images)}
    if args.color_swaps:
        report["color_accuracy"] = hard_negative_accuracy(tower, images, kind="color_attribution", change="colors")
        log.info("held-out color-attribution pictures whose caption beats the colors-exchanged one: %.1f%%",
                 100 * report["color_accuracy"])
    if args.shape_swaps:
        report["shape_accuracy"] = hard_negative_accuracy(tower, images, change="shapes")
        log.info("held-out relation pictures whose caption beats the shapes-exchanged one: %.1f%%",
                 100 * report["shape_accuracy"])
    if args.twice_negatives:
        report["twice_accuracy"] = hard_negative_accuracy(tower, images, kind="color_attribution", change="twice")
        log.info("held-out two-shape pictures whose caption beats the first-shape-twice one: %.1f%%",
                 100 * report["twice_accuracy"])
    if args.count_negatives:
        report["count_accuracy"] = hard_negative_accuracy(tower, images, kind="counting", change="count")
        log.info("held-out counting pictures whose caption beats the count-changed one: %.1f%%",
                 100 * report["count_accuracy"])
    if args.anchor:
        held_out = [caption for _, caption in (ShapesDataset(256, kinds=KINDS, split="eval").scene(i)
                                               for i in range(256))]
        with torch.no_grad():
            out = tower.encode_tokens(tower.tokenize(held_out))
            report["anchor_change"] = anchor_loss(out, reference, held_out).item()
        log.info("held-out captions' token outputs moved by %.3f (mean square, relative to the --init tower's)",
                 report["anchor_change"])
    if args.paraphrase:
        report["paraphrased_relation_accuracy"] = hard_negative_accuracy(tower, images, paraphrase=1.0)
        log.info("the same for relation inversions, paraphrased: %.1f%%", 100 * report["paraphrased_relation_accuracy"])
    shim = type("M", (), {"get_learned_conditioning": staticmethod(lambda caps: tower.encode(list(caps)))})()
    with torch.no_grad():
        report.update({f"text_change_{k}": v for k, v in text_change(shim, num=128).items()})
    save_checkpoint({f"cond_stage_model.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()},
                    args.out)
    log.info("held-out relation pictures whose caption beats the inverted one: %.1f%%; text encoder output "
             "change: relation inverted %.3f, shapes exchanged %.3f; wrote %s", 100 * report["relation_accuracy"],
             report["text_change_relation"], report["text_change_shapes"], args.out)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
