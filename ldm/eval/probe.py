"""Does a model use the relation words of its prompts? A loss-level probe for the position category.

For held-out relation scenes of the shapes world ("a circle to the left of a square"), the model predicts the
clean latent from a noisy one at a few timesteps three ways, with the same noise each time:

- ``true``: with the scene's own caption;
- ``swapped``: with the caption whose relation is inverted ("... to the right of ...", every other word kept);
- ``no_signal``: with the true caption, but from pure noise at that noise level (the picture's share of the
  noisy latent removed).

It reports the mean squared error of each prediction against the picture's latent. A model that places objects
by the words predicts worse with the swapped caption (``ratio = swapped / true`` > 1, most at high noise, where
the layout is decided); a ratio of 1.000 means the relation words change nothing. ``no_signal`` against ``true``
shows how much a prediction at that timestep leans on what is left of the picture in the noise: at the last
timestep of a schedule whose terminal SNR is not zero (SD's), a model can read the layout from that leftover
instead of from the prompt, and at sampling time, when the start is pure noise, it then follows the noise.

It also reports how much the text encoder's output changes when only the relation is inverted, against when
only the two objects' shapes are exchanged (:func:`text_change`): a tower that has merged the relation words
("left" and "right" coded alike) gives the UNet nothing to place objects by.

    python -m ldm.eval relations --ckpt model.safetensors [--num 128] [--no-colors]
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from ldm.data.shapes import INVERSE_RELATION, ShapesDataset, caption_spec, scene_to_prompt_spec

__all__ = ["relation_captions", "relation_probe", "text_change", "format_probe"]


def relation_captions(spec: dict[str, Any], seed: int, colors: bool = True) -> tuple[str, str]:
    """The caption of a relation spec and the same caption with the relation inverted (same wording otherwise);
    ``colors=False`` leaves colors and sizes out of both."""
    spec = {"objects": [dict(g) for g in spec["objects"]], "relation": dict(spec["relation"])}
    if not colors:
        for g in spec["objects"]:
            g["color"] = g["size"] = None
    inverse = INVERSE_RELATION[spec["relation"]["type"]]
    swapped = {"objects": spec["objects"], "relation": dict(spec["relation"], type=inverse)}
    return caption_spec(spec, random.Random(seed)), caption_spec(swapped, random.Random(seed))


def _shapes_exchanged(spec: dict[str, Any]) -> dict[str, Any]:
    objects = [dict(g) for g in spec["objects"]]
    objects[0]["shape"], objects[1]["shape"] = objects[1]["shape"], objects[0]["shape"]
    return {"objects": objects, "relation": dict(spec["relation"])}


@torch.no_grad()
def text_change(model: Any, num: int = 128, seed: int = 0, colors: bool = True) -> dict[str, float]:
    """Mean relative change ``|E(a) - E(b)| / |E(a)|`` of the text encoder's output (``get_learned_conditioning``,
    all tokens) over ``num`` held-out relation captions ``a`` when ``b`` is ``a`` with the relation inverted
    (``"relation"``) or with the two objects' shapes exchanged (``"shapes"``), every other word kept."""
    data = ShapesDataset(num, seed=seed, kinds=["relation"], split="eval")
    sums = {"relation": 0.0, "shapes": 0.0}
    for i in range(num):
        spec = scene_to_prompt_spec(data.scene(i)[0])
        true, swapped = relation_captions(spec, seed=i, colors=colors)
        exchanged, _ = relation_captions(_shapes_exchanged(spec), seed=i, colors=colors)
        e = model.get_learned_conditioning([true, swapped, exchanged]).float()
        for name, other in (("relation", e[1]), ("shapes", e[2])):
            sums[name] += ((e[0] - other).norm() / e[0].norm().clamp_min(1e-12)).item()
    return {k: v / num for k, v in sums.items()}


@torch.no_grad()
def relation_probe(model: Any, num: int = 128, timesteps: Sequence[int] = (999, 900, 800, 600), size: int = 64,
                   seed: int = 0, colors: bool = True, batch_size: int = 32) -> list[dict[str, float]]:
    """Rows ``{t, true, swapped, ratio, no_signal}`` (see the module docstring) for a latent diffusion model
    (``encode_first_stage``, ``get_learned_conditioning``, ``denoiser()`` and ``num_timesteps``, as
    :class:`ldm.model.LatentDiffusion`), averaged over ``num`` held-out relation scenes."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"num={num} and batch_size={batch_size} must be >= 1")
    last = int(model.num_timesteps) - 1
    bad = [t for t in timesteps if not 0 <= int(t) <= last]
    if bad or not timesteps:
        raise ValueError(f"timesteps {list(timesteps)} must be in [0, {last}]; e.g. 999 900 800 600")
    data = ShapesDataset(num, size=size, seed=seed, kinds=["relation"], split="eval")
    param = next(model.parameters())
    denoiser = model.denoiser()
    sums = {int(t): {"true": 0.0, "swapped": 0.0, "no_signal": 0.0} for t in timesteps}
    for start in range(0, num, batch_size):
        idx = range(start, min(start + batch_size, num))
        images = torch.stack([data[i]["image"] for i in idx]).to(param.device, param.dtype)
        pairs = [relation_captions(scene_to_prompt_spec(data.scene(i)[0]), seed=i, colors=colors) for i in idx]
        z = model.encode_first_stage(images, sample=False).float()
        cond = {name: model.get_learned_conditioning({"txt": list(caps)})
                for name, caps in zip(("true", "swapped"), zip(*pairs))}
        for t in sums:
            g = torch.Generator().manual_seed(1_000_003 * t + start)
            noise = torch.randn(z.shape, generator=g).to(z.device)
            sigma = denoiser.t_to_sigma(torch.tensor(float(t), device=z.device)).expand(len(z))
            noisy = z + sigma.view(-1, 1, 1, 1) * noise
            for name, x, c in (("true", noisy, cond["true"]), ("swapped", noisy, cond["swapped"]),
                               ("no_signal", sigma.view(-1, 1, 1, 1) * noise, cond["true"])):
                err = (denoiser(x, sigma, c).float() - z).square().mean(dim=(1, 2, 3))
                sums[t][name] += err.sum().item()
    rows = []
    for t, s in sums.items():
        row = {"t": t, **{k: v / num for k, v in s.items()}}
        row["ratio"] = row["swapped"] / row["true"]
        rows.append(row)
    return rows


def format_probe(rows: Sequence[dict[str, float]], num: int, colors: bool,
                 text: dict[str, float] | None = None) -> str:
    """A markdown table of :func:`relation_probe` rows (and the :func:`text_change` numbers, if given)."""
    lines = [f"x0 error of {num} held-out relation scenes ({'with' if colors else 'without'} colors in the "
             "captions): true caption, relation swapped, and from pure noise", "",
             "| t | true | swapped | swapped / true | no signal |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['t']} | {r['true']:.4f} | {r['swapped']:.4f} | {r['ratio']:.3f} | {r['no_signal']:.4f} |")
    if text is not None:
        lines += ["", f"text encoder output, relative change: relation inverted {text['relation']:.3f}, "
                      f"the two shapes exchanged {text['shapes']:.3f}"]
    return "\n".join(lines) + "\n"
