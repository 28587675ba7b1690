"""The shapes world's opt-in new shape (a five-point star): drawn only where asked for, found by the analyzer only
where asked for, and never confused with the default shapes; the eval's star prompts, the data module's star
pictures and ``python -m ldm.eval geneval --lora --focus-shape``."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from ldm.data.datamodule import ShapesDataModule
from ldm.data.shapes import (ALL_SHAPES, COLORS, KINDS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset, render,
                             sample_scene, scene_rng, spec_to_scene)
from ldm.eval import cli
from ldm.eval.analyzer import analyze, solidity
from ldm.eval.geneval import CATEGORIES, evaluate, format_report, make_eval_prompts

STAR_WORLD = SHAPES + ("star",)


def _found(image, shapes=STAR_WORLD):
    return sorted((str(d.shape), d.color, d.size) for d in analyze(image, shapes=shapes))


def _truth(scene):
    return sorted((o.shape, o.color, o.size) for o in scene.objects)


def test_the_analyzer_finds_stars_of_every_size_color_and_count():
    """Rendered scenes that each show stars (every kind, both sizes, all colors, 1-4 stars) at 64 px: the analyzer
    that knows stars finds exactly their objects."""
    seen, wrong = Counter(), []
    for i in range(240):
        scene = sample_scene(random.Random(f"star-test/{i}"), KINDS[i % 4], STAR_WORLD, focus="star")
        seen.update((o.size, o.color) for o in scene.objects if o.shape == "star")
        seen[sum(o.shape == "star" for o in scene.objects)] += 1
        if _found(render(scene, 64)) != _truth(scene):
            wrong.append((_truth(scene), _found(render(scene, 64))))
    assert not wrong, wrong[:3]
    assert {(z, c) for z in SIZES for c in COLORS} <= set(seen) and {1, 2, 3, 4} <= set(seen)


def test_stars_are_never_named_in_the_default_world():
    """On rendered default scenes the analyzer that knows stars gives exactly the default analyzer's verdicts
    (never "star"), and the default analyzer never names a large star a circle, square or triangle."""
    for i in range(200):
        image = render(sample_scene(scene_rng(23, i, "eval")), 64)
        assert analyze(image, shapes=STAR_WORLD) == analyze(image)
    for i, color in enumerate(COLORS):
        star = Scene("single", [ShapeObject("star", color, "large", (0.3 + 0.05 * i, 0.5))])
        assert [d.shape for d in analyze(render(star, 64))] in ([None], [])


def test_solidity_separates_stars_from_the_convex_shapes():
    def blob(shape, size):
        image = render(Scene("single", [ShapeObject(shape, "red", size, (0.5, 0.5))]), 64)
        x0, y0, x1, y1 = analyze(image, shapes=STAR_WORLD)[0].bbox
        rgb = np.asarray(image, dtype=np.float32)[y0:y1 + 1, x0:x1 + 1]
        return np.linalg.norm(rgb - np.asarray(COLORS["red"], dtype=np.float32), axis=-1) < 60

    for size in SIZES:
        assert solidity(blob("star", size)) < 0.65
        assert min(solidity(blob(s, size)) for s in SHAPES) > 0.85


def test_the_default_world_has_no_stars_and_keeps_its_draws():
    data = ShapesDataset(200, seed=4)
    assert all(o.shape in SHAPES for i in range(200) for o in data.scene(i)[0].objects)
    explicit = ShapesDataset(200, seed=4, shapes=SHAPES, sizes=SIZES)
    assert [data.scene(i) for i in range(50)] == [explicit.scene(i) for i in range(50)]
    assert make_eval_prompts(4, seed=2) == make_eval_prompts(4, seed=2, focus=None)
    assert not any("star" in p.prompt for p in make_eval_prompts(20, seed=0))


def test_star_pictures_each_show_a_star_and_say_so():
    data = ShapesDataset(120, seed=1, focus="star", color_drop=0.0)
    assert data.shapes == STAR_WORLD
    kinds = Counter()
    for i in range(120):
        scene, text = data.scene(i)
        kinds[scene.kind] += 1
        assert any(o.shape == "star" for o in scene.objects) and "star" in text
    assert set(kinds) == set(KINDS)
    # their own stream: not the default world's pictures with a star put in
    assert data.scene(0)[0] != ShapesDataset(1, seed=1).scene(0)[0]
    large = ShapesDataset(60, seed=1, focus="star", sizes=["large"])
    sizes = Counter(o.size for i in range(60) for o in large.scene(i)[0].objects)
    assert sizes["large"] > 3 * sizes["small"]  # small only where four large ones do not fit
    stars = ShapesDataset(60, seed=1, shapes=STAR_WORLD)  # a world with stars among the others
    assert {o.shape for i in range(60) for o in stars.scene(i)[0].objects} == set(STAR_WORLD)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"focus": "hexagon"}, "unknown shape 'hexagon'"),
    ({"shapes": ["circle", "square"], "focus": "star"}, "focus shape 'star' is not among shapes"),
    ({"shapes": ["circle"]}, "at least two distinct shapes"),
    ({"sizes": ["huge"]}, "sizes=['huge'] must be a non-empty list of small, large"),
])
def test_bad_shape_options_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        ShapesDataset(4, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_data_module_mixes_star_pictures_into_the_default_world():
    data = ShapesDataModule(num_train=6, num_val=0, focus="star", num_focus=4, focus_sizes=["large"])
    data.setup()
    captions = [data.train_set[i]["caption"] for i in range(10)]
    assert not any("star" in c for c in captions[:6]) and all("star" in c for c in captions[6:])
    for kwargs, fragment in (({"focus": "star"}, "go together"), ({"focus": "hexagon", "num_focus": 2},
                                                                   "unknown shape 'hexagon'")):
        with pytest.raises(ValueError, match=fragment):
            ShapesDataModule(**kwargs)


def test_focus_repeats_shows_each_focus_picture_that_many_times_per_epoch():
    data = ShapesDataModule(num_train=6, num_val=0, focus="star", num_focus=4, focus_repeats=3)
    data.setup()
    assert len(data.train_set) == 6 + 3 * 4
    captions = [data.train_set[i]["caption"] for i in range(len(data.train_set))]
    assert captions[6:10] == captions[10:14] == captions[14:18] and all("star" in c for c in captions[6:])
    assert torch.equal(data.train_set[6]["image"], data.train_set[14]["image"])
    for kwargs, fragment in (({"focus": "star", "num_focus": 2, "focus_repeats": 0}, "focus_repeats=0 must be"),
                             ({"focus": "star", "num_focus": 2, "focus_repeats": 2.5}, "must be an int"),
                             ({"focus_repeats": 2}, "set focus and num_focus")):
        with pytest.raises(ValueError, match=fragment) as info:
            ShapesDataModule(**kwargs)
        assert "\n" not in str(info.value)


def test_focus_kinds_draw_the_focus_pictures_scene_kinds_and_leave_the_default_worlds():
    data = ShapesDataModule(num_train=40, num_val=0, focus="star", num_focus=30, focus_repeats=2,
                            focus_kinds=["color_attribution"])
    data.setup()
    default, focused = data.train_set.datasets[0], data.train_set.datasets[1]
    assert {focused.scene(i)[0].kind for i in range(30)} == {"color_attribution"}
    assert len({default.scene(i)[0].kind for i in range(40)}) > 1  # kinds (all of them) as before
    weighted = ShapesDataModule(num_train=4, num_val=0, focus="star", num_focus=200,
                                focus_kinds=["single", "color_attribution", "color_attribution"])
    weighted.setup()
    kinds = [weighted.train_set.datasets[1].scene(i)[0].kind for i in range(200)]
    assert set(kinds) == {"single", "color_attribution"} and 110 < kinds.count("color_attribution") < 160
    for kwargs, fragment in (({"focus": "star", "num_focus": 2, "focus_kinds": ["spiral"]}, "focus_kinds has unknown"),
                             ({"focus_kinds": ["single"]}, "set focus and num_focus")):
        with pytest.raises(ValueError, match=fragment) as info:
            ShapesDataModule(**kwargs)
        assert "\n" not in str(info.value)


def test_star_eval_prompts_and_scores():
    prompts = make_eval_prompts(8, seed=0, focus="star")
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(8)]
    assert all(any(g["shape"] == "star" for g in p.spec["objects"]) and "star" in p.prompt for p in prompts)
    position = [p.spec for p in prompts if p.category == "position"]
    roles = {role for s in position for role in ("subject", "reference")
             if s["objects"][s["relation"][role]]["shape"] == "star"}
    assert roles == {"subject", "reference"}  # the star stands left of / above ... and is what others stand by

    def truth(texts, seeds):
        spec = next(p.spec for p in prompts if p.prompt == texts[0])
        return [render(spec_to_scene(spec, random.Random(s)), 64) for s in seeds]

    report = evaluate(truth, prompts, images_per_prompt=1, shapes=STAR_WORLD, focus="star")
    assert report["overall"] == 1.0 and report["focus_rate"] == 1.0
    assert "Images that show a star" in format_report(report) and "**100.0%** (48 / 48)" in format_report(report)
    # the default analyzer does not see the stars: those prompts fail for want of the star
    blind = evaluate(truth, prompts, images_per_prompt=1)
    assert blind["categories"]["single_object"]["accuracy"] == 0.0 and "focus_rate" not in blind
    with pytest.raises(ValueError, match="focus shape 'star' is not among shapes"):
        evaluate(truth, prompts, images_per_prompt=1, shapes=SHAPES, focus="star")


def test_cli_geneval_loads_loras_and_makes_star_prompts(tmp_path, monkeypatch):
    ckpt, lora = tmp_path / "model.ckpt", tmp_path / "star.safetensors"
    ckpt.write_bytes(b"x")
    lora.write_bytes(b"x")
    specs = {p.prompt: p.spec for p in make_eval_prompts(1, 5, focus="star")}
    loaded = []

    class Pipe:
        def load_lora(self, path, weight):
            loaded.append((str(path), weight))

        def __call__(self, prompts, *, seeds, height, width, **options):
            from types import SimpleNamespace
            return SimpleNamespace(images=[render(spec_to_scene(specs[p], random.Random(s)), height)
                                           for p, s in zip(prompts, seeds)])

    monkeypatch.setattr(cli, "_load_pipeline", lambda args: Pipe())
    report = cli.main(["geneval", "--ckpt", str(ckpt), "--n", "1", "--seed", "5", "--images-per-prompt", "2",
                       "--lora", f"{lora}:0.7", "--focus-shape", "star"])
    assert loaded == [(str(lora), 0.7)]
    assert report["overall"] == 1.0 and report["focus_rate"] == 1.0 and report["num_images"] == 12


def test_cli_geneval_refuses_a_missing_lora(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        cli.main(["geneval", "--ckpt", str(ckpt), "--lora", str(tmp_path / "nope.safetensors")])
    assert e.value.code == 2 and "--lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["geneval", "--ckpt", str(ckpt), "--focus-shape", "hexagon"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # --paraphrase words the default prompts, which name no star
        cli.main(["geneval", "--ckpt", str(ckpt), "--focus-shape", "star", "--paraphrase"])
    assert e.value.code == 2 and "--focus-shape makes its own prompts" in capsys.readouterr().err
    assert ALL_SHAPES == SHAPES + ("star",)
