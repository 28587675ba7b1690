import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import (BACKGROUND, Scene, ShapeObject, render, sample_scene, scene_rng,
                             scene_to_prompt_spec, spec_to_scene)
from ldm.eval import cli
from ldm.eval.analyzer import analyze, classify_shape
from ldm.eval.geneval import CATEGORIES, evaluate, failure_cause, format_report, make_eval_prompts, score
from ldm.metrics import psnr, ssim


def _obj(shape, color, center, size="large"):
    return ShapeObject(shape, color, size, center)


def _spec(*groups, relation=None, category=None):
    objects = [{"shape": s, "color": c, "size": None, "count": n} for s, c, n in groups]
    rel = None if relation is None else {"type": relation, "subject": 0, "reference": 1}
    return {"category": category, "objects": objects, "relation": rel}


def _detect(*objects, size=64):
    return analyze(render(Scene("test", list(objects)), size))


# ------------------------------------------------------------------------------------------------ analyzer
def test_analyzer_finds_every_object_of_random_scenes():
    wrong = 0
    for i in range(300):
        scene = sample_scene(scene_rng(11, i, "eval"))
        found = sorted((d.shape, d.color, d.size) for d in analyze(render(scene, 64)))
        wrong += found != sorted((o.shape, o.color, o.size) for o in scene.objects)
    assert wrong == 0


def test_analyzer_centers_and_sizes():
    dets = _detect(_obj("circle", "red", (0.25, 0.7)), _obj("square", "white", (0.75, 0.25), "small"))
    by_color = {d.color: d for d in dets}
    assert by_color["red"].shape == "circle" and by_color["red"].size == "large"
    assert by_color["white"].shape == "square" and by_color["white"].size == "small"
    assert by_color["red"].center == pytest.approx((0.25, 0.7), abs=0.02)
    assert by_color["white"].center == pytest.approx((0.75, 0.25), abs=0.02)
    assert 0.7 < by_color["red"].fill < 0.86 and by_color["white"].fill > 0.95


def _painted(*rects):
    """A gray 64x64 picture with solid rectangles (x0, y0, x1, y1 exclusive, color name) painted in order."""
    from ldm.data.shapes import COLORS

    arr = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    for x0, y0, x1, y1, color in rects:
        arr[y0:y1, x0:x1] = COLORS[color]
    return arr


@pytest.mark.parametrize("split", [0.7, 0.5], ids=["mostly-yellow", "half-half"])
def test_two_tone_object_is_one_object(split):
    """A generated square whose color drifts from yellow to orange across it is one square, not two blobs."""
    cut = 10 + round(20 * split)
    dets = analyze(_painted((10, 10, 30, 30, "yellow"), (cut, 10, 30, 30, "orange")))
    assert [(d.shape, d.size) for d in dets] == [("square", "large")]
    assert dets[0].color == "yellow" or split == 0.5
    assert dets[0].center == pytest.approx((0.31, 0.31), abs=0.02)


def test_touching_objects_of_different_colors_stay_two():
    img = render(Scene("t", [_obj("circle", "red", (0.3, 0.5)), _obj("square", "blue", (0.62, 0.5))]))
    arr = np.asarray(img).copy()
    assert not (arr[32, 28:44] == BACKGROUND).all(axis=-1).any()  # they do touch along the middle row
    assert sorted((d.shape, d.color) for d in analyze(arr)) == [("circle", "red"), ("square", "blue")]


def test_analyzer_accepts_tensors_and_rejects_bad_input():
    img = render(Scene("t", [_obj("triangle", "green", (0.5, 0.5))]))
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert [(d.shape, d.color) for d in analyze(t)] == [("triangle", "green")]
    with pytest.raises(TypeError, match="PIL image"):
        analyze([1, 2, 3])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        analyze(torch.zeros(1, 3, 8, 8))


def test_analyzer_ignores_empty_noise_and_odd_blobs():
    assert analyze(Image.new("RGB", (64, 64), BACKGROUND)) == []
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert [d for d in analyze(noise) if d.shape is not None] == []
    bar = np.zeros((4, 30), dtype=bool)
    bar[:] = True
    assert classify_shape(bar) is None  # far too elongated
    ring = np.ones((20, 20), dtype=bool)
    ring[3:17, 3:17] = False
    assert classify_shape(ring) is None  # no shape has a hollow box


# ------------------------------------------------------------------------------------------------ prompts
def test_eval_prompts_are_deterministic_and_balanced():
    prompts = make_eval_prompts(8, seed=3)
    assert prompts == make_eval_prompts(8, seed=3) and prompts != make_eval_prompts(8, seed=4)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(8)]
    counting = [p.spec["objects"][0]["count"] for p in prompts if p.category == "counting"]
    assert sorted(set(counting)) == [1, 2, 3, 4]
    relations = {p.spec["relation"]["type"] for p in prompts if p.category == "position"}
    assert relations == {"left of", "right of", "above", "below"}
    for category, prompt, spec in prompts:
        for g in spec["objects"]:
            assert g["shape"] in prompt
            assert (g["color"] is not None) == (category in ("colors", "color_attribution"))
            if g["color"]:
                assert g["color"] in prompt
    with pytest.raises(ValueError, match="n_per_category"):
        make_eval_prompts(0)


def test_ground_truth_scores_100_percent_in_every_category():
    prompts = make_eval_prompts(40, seed=0)
    hits = {c: 0 for c in CATEGORIES}
    for i, (category, _, spec) in enumerate(prompts):
        hits[category] += score(spec, analyze(render(spec_to_scene(spec, random.Random(i)), 64)))
    assert hits == {c: 40 for c in CATEGORIES}


def test_full_training_specs_score_true():
    for i in range(150):
        scene = sample_scene(scene_rng(5, i))
        assert score(scene_to_prompt_spec(scene), analyze(render(scene)))


# ------------------------------------------------------------------------------------------------ failures
def test_wrong_color_fails():
    dets = _detect(_obj("circle", "blue", (0.5, 0.5)))
    assert score(_spec(("circle", "blue", 1), category="colors"), dets)
    assert not score(_spec(("circle", "red", 1), category="colors"), dets)


def test_swapped_color_attribution_fails():
    dets = _detect(_obj("circle", "blue", (0.3, 0.3)), _obj("square", "red", (0.7, 0.7)))
    spec = _spec(("circle", "red", 1), ("square", "blue", 1), category="color_attribution")
    assert not score(spec, dets)
    assert score(_spec(("circle", "blue", 1), ("square", "red", 1), category="color_attribution"), dets)


def test_wrong_count_fails():
    objects = [_obj("square", "yellow", c, "small") for c in ((0.2, 0.2), (0.8, 0.2), (0.2, 0.8))]
    dets = _detect(*objects)
    assert score(_spec(("square", None, 3), category="counting"), dets)
    assert not score(_spec(("square", None, 2), category="counting"), dets)
    assert not score(_spec(("square", None, 4), category="counting"), dets)
    mixed = _detect(*objects[:2], _obj("square", "red", (0.8, 0.8), "small"))
    assert not score(_spec(("square", "yellow", 3), category="counting"), mixed)
    assert not score(_spec(("square", "yellow", 2), category="counting"), mixed)  # a third square is there


@pytest.mark.parametrize("relation, inverse", [("left of", "right of"), ("above", "below")])
def test_swapped_positions_fail(relation, inverse):
    a, b = ((0.25, 0.5), (0.75, 0.5)) if relation == "left of" else ((0.5, 0.25), (0.5, 0.75))
    dets = _detect(_obj("triangle", "purple", a), _obj("circle", "orange", b))
    assert score(_spec(("triangle", None, 1), ("circle", None, 1), relation=relation, category="position"), dets)
    assert not score(_spec(("triangle", None, 1), ("circle", None, 1), relation=inverse), dets)
    assert not score(_spec(("circle", None, 1), ("triangle", None, 1), relation=relation), dets)


def test_position_needs_a_clear_margin_and_both_objects():
    dets = _detect(_obj("triangle", "purple", (0.49, 0.2)), _obj("circle", "orange", (0.51, 0.75)))
    spec = _spec(("triangle", None, 1), ("circle", None, 1), relation="left of")
    assert not score(spec, dets)
    only = _detect(_obj("triangle", "purple", (0.2, 0.5)))
    assert not score(spec, only)


def test_failure_causes():
    red_sq = _obj("square", "red", (0.25, 0.5))
    blue_ci = _obj("circle", "blue", (0.75, 0.5))
    dets = _detect(red_sq, blue_ci)
    left = _spec(("square", None, 1), ("circle", None, 1), relation="left of", category="position")
    assert failure_cause(left, dets) is None and score(left, dets)
    assert failure_cause(_spec(("square", None, 1), ("circle", None, 1), relation="right of"), dets) == "wrong position"
    assert failure_cause(_spec(("triangle", None, 1), category="single_object"), dets) == "missing object"
    assert failure_cause(_spec(("square", "green", 1), category="colors"), dets) == "wrong attribute"
    two = _detect(red_sq, _obj("square", "red", (0.75, 0.5)))
    assert failure_cause(_spec(("square", None, 1), category="counting"), two) == "extra objects"
    assert failure_cause(_spec(("square", None, 3), category="counting"), two) == "missing object"
    assert failure_cause(_spec(("square", None, 1), category="single_object"), two) is None  # "at least one"


def test_wrong_shape_fails():
    dets = _detect(_obj("triangle", "green", (0.5, 0.5)))
    assert score(_spec(("triangle", None, 1), category="single_object"), dets)
    assert not score(_spec(("circle", None, 1), category="single_object"), dets)
    assert not score(_spec(("triangle", None, 1), ("square", None, 1), category="two_objects"), dets)


def test_empty_and_noise_images_fail_everything():
    empty = Image.new("RGB", (64, 64), BACKGROUND)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for _, _, spec in make_eval_prompts(3, seed=1):
        assert not score(spec, analyze(empty))
        assert not score(spec, analyze(noise))


# ------------------------------------------------------------------------------------------------ evaluate
def _oracle(prompts, fail_categories=()):
    """A fake generator: draws the truth, or an empty picture for prompts of ``fail_categories``."""
    table = {p.prompt: p for p in prompts}

    def generate(texts, seeds):
        p = table[texts[0]]
        if p.category in fail_categories:
            return [Image.new("RGB", (64, 64), BACKGROUND) for _ in seeds]
        return [render(spec_to_scene(p.spec, random.Random(s))) for s in seeds]
    return generate


def test_evaluate_report():
    prompts = make_eval_prompts(2, seed=0)
    seen = []

    def generate(texts, seeds):
        seen.extend(seeds)
        return _oracle(prompts, ("counting", "position"))(texts, seeds)

    report = evaluate(generate, prompts, images_per_prompt=3, seed=10)
    assert seen == list(range(10, 10 + 3 * len(prompts)))
    assert report["num_images"] == 36 and report["num_prompts"] == 12 and len(report["records"]) == 36
    acc = {c: v["accuracy"] for c, v in report["categories"].items()}
    assert acc == {c: 0.0 if c in ("counting", "position") else 1.0 for c in CATEGORIES}
    assert report["overall"] == pytest.approx(4 / 6)
    table = format_report(report)
    assert "| counting | 0.0% | 0 / 6 |" in table and "66.7%" in table and "36 images" in table
    # the empty pictures drawn for counting and position fail for want of the objects
    assert report["categories"]["counting"]["causes"] == {"missing object": 6}
    assert report["categories"]["colors"]["causes"] == {}
    assert "| counting | 6 | 0 | 0 | 0 |" in table
    assert all(r["cause"] is None and r["found"] for r in report["records"] if r["correct"])


def test_overall_is_the_mean_of_categories():
    prompts = make_eval_prompts(1, seed=0)[:1] + make_eval_prompts(3, seed=0)[3:6]  # 1 single, 3 two_objects
    report = evaluate(_oracle(prompts, ("two_objects",)), prompts, images_per_prompt=1)
    assert report["overall"] == pytest.approx(0.5)  # not 1/4 as a mean over images would be


def test_evaluate_errors():
    prompts = make_eval_prompts(1)
    with pytest.raises(ValueError, match="one image per seed"):
        evaluate(lambda texts, seeds: [], prompts)
    with pytest.raises(ValueError, match="images_per_prompt"):
        evaluate(_oracle(prompts), prompts, images_per_prompt=0)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(_oracle(prompts), [])


# ------------------------------------------------------------------------------------------------ metrics
def test_psnr_values():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    assert psnr(x, x + 0.2) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-3)  # 0.1 on the [0, 1] scale
    y = (x + 1) / 2
    assert psnr(y[0], y[0] + 0.01, value_range=(0, 1)).item() == pytest.approx(40.0, abs=1e-3)
    assert psnr(x[0], x[0] + 0.2).ndim == 0


def test_ssim_values():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert torch.equal(ssim(x, x), torch.ones(2))
    a, b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.25)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)  # only the luminance term differs from 1
    assert ssim(a, b, value_range=(0, 1)).item() == pytest.approx(expected, rel=1e-5)
    assert ssim(x, -x).max() < -0.5  # inverted structure
    noisy = ssim(x, x + 0.3 * torch.randn_like(x))
    assert (noisy < 0.99).all() and (noisy > ssim(x, x + 1.0 * torch.randn_like(x))).all()
    assert ssim(x[0], x[0]).ndim == 0
    assert torch.allclose(ssim(x, x.roll(1, -1)), ssim(x.roll(1, -1), x))


def test_metric_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 8))
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="value_range"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), value_range=(1, 0))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv, message", [
    (["geneval"], "required: --ckpt"),
    (["geneval", "--ckpt", "missing.safetensors"], "no such file"),
    (["recon", "--ckpt", "missing.ckpt"], "no such file"),
    (["geneval", "--ckpt", "{ckpt}", "--n", "0"], "must be >= 1"),
    (["geneval", "--ckpt", "{ckpt}", "--config", "nope.yaml"], "--config nope.yaml"),
    (["recon", "--ckpt", "{ckpt}", "--size", "16"], "too small"),
    (["recon", "--ckpt", "{ckpt}", "--out", "{dir}"], "is a folder"),
    (["geneval", "--ckpt", "{ckpt}", "--sampler", "Eulr"], "unknown sampler 'Eulr'"),
    (["geneval", "--ckpt", "{ckpt}", "--guidance-rescale", "1.5"], "outside [0, 1]"),
    (["relations", "--ckpt", "missing.safetensors"], "no such file"),
    (["relations", "--ckpt", "{ckpt}", "--num", "0"], "must be >= 1"),
    (["score"], "invalid choice"),
])
def test_cli_argument_errors(tmp_path, capsys, argv, message):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    argv = [a.format(ckpt=ckpt, dir=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


class _FakeText2Image:
    """Stands in for ldm.pipeline.Text2Image: draws the truth of eval prompts; its VAE is the identity."""

    def __init__(self, n, seed):
        self.specs = {p.prompt: p.spec for p in make_eval_prompts(n, seed)}
        self.calls = []
        identity = torch.nn.Linear(1, 1)  # gives the fake VAE a parameter (device / dtype)
        identity.encode = lambda x: SimpleNamespace(mode=lambda: x * 1.0)
        identity.decode = lambda z: z
        self.model = SimpleNamespace(first_stage_model=identity)

    def __call__(self, prompts, negative_prompts=None, *, seeds, height, width, **options):
        self.calls.append({"seeds": seeds, "height": height, "width": width, **options})
        return SimpleNamespace(images=[render(spec_to_scene(self.specs[p], random.Random(s)), height)
                                       for p, s in zip(prompts, seeds)])


def test_cli_geneval_runs_the_pipeline(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    fake = _FakeText2Image(1, 5)
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: fake)
    out = tmp_path / "report.md"
    report = cli.main(["geneval", "--ckpt", str(ckpt), "--n", "1", "--seed", "5", "--images-per-prompt", "2",
                       "--steps", "3", "--sampler", "DDIM", "--guidance-rescale", "0.7", "--out", str(out)])
    assert report["overall"] == 1.0 and report["num_images"] == 12
    assert fake.calls[0] == {"seeds": [5, 6], "height": 64, "width": 64, "steps": 3, "sampler": "DDIM",
                             "guidance_rescale": 0.7}
    assert "| **overall** (mean of categories) | **100.0%** |" in out.read_text()
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == 12


class _FailsCounting(_FakeText2Image):
    """Draws the truth, except an empty picture for counting prompts."""

    def __call__(self, prompts, negative_prompts=None, **kw):
        out = super().__call__(prompts, negative_prompts, **kw)
        if prompts[0] in self.counting:
            out.images = [Image.new("RGB", (64, 64), BACKGROUND) for _ in out.images]
        return out


def test_cli_geneval_saves_every_picture_with_its_verdict(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    fake = _FailsCounting(1, 0)
    fake.counting = {p.prompt for p in make_eval_prompts(1, 0) if p.category == "counting"}
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: fake)
    shots = tmp_path / "shots"
    report = cli.main(["geneval", "--ckpt", str(ckpt), "--n", "1", "--images-per-prompt", "2",
                       "--save-images", str(shots), "--out", str(tmp_path / "r.md")])
    names = sorted(p.name for p in shots.glob("0*.png"))
    assert len(names) == 12 and names[0] == "00000-single_object-right.png"
    wrong = [r for r in report["records"] if not r["correct"]]
    assert wrong and all(r["category"] == "counting" and r["image"].endswith("-wrong.png") for r in wrong)
    assert all((shots / r["image"]).is_file() for r in report["records"])
    assert json.loads((tmp_path / "r.json").read_text())["records"][0]["image"] == names[0]
    lines = (shots / "verdicts.txt").read_text().splitlines()
    assert len(lines) == 12 and "wrong (missing object)" in lines[names.index(wrong[0]["image"])]
    sheet = Image.open(shots / "sheet-counting.png")
    assert sheet.size == (2 * 70, 70)  # one prompt: a row of two pictures, each framed by 3 px
    assert sheet.getpixel((0, 0)) == (220, 40, 40)  # framed red: wrong
    assert Image.open(shots / "sheet-colors.png").getpixel((0, 0)) == (40, 200, 40)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        cli.main(["geneval", "--ckpt", str(ckpt), "--n", "1", "--save-images", str(tmp_path / "afile")])


def test_cli_recon_of_an_identity_autoencoder(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: _FakeText2Image(1, 0))
    out = tmp_path / "recon.json"
    report = cli.main(["recon", "--ckpt", str(ckpt), "--num", "3", "--batch-size", "2", "--size", "32",
                       "--out", str(out)])
    assert report["psnr"] == float("inf") and report["ssim"] == pytest.approx(1.0)
    assert json.loads(out.read_text())["num_images"] == 3


# ------------------------------------------------------------------------------------------------ relation probe
def test_relation_captions_swap_only_the_relation():
    from ldm.eval.probe import relation_captions

    spec = {"objects": [{"shape": "circle", "color": "red", "size": "small", "count": 1},
                        {"shape": "square", "color": "blue", "size": None, "count": 1}],
            "relation": {"type": "left of", "subject": 0, "reference": 1}}
    seen = set()
    for seed in range(40):
        true, swapped = relation_captions(spec, seed)
        assert true != swapped and true.split()[0] == swapped.split()[0]
        seen.add(("left" in true) == ("right" in swapped))
        bare, bare_swapped = relation_captions(spec, seed, colors=False)
        assert "red" not in bare and "small" not in bare and "blue" not in bare_swapped
    assert seen == {True}  # mirrored wordings ("a square right of a circle") swap consistently too


class _ProbeStub(torch.nn.Module):
    """A 'model' whose prediction is right (up to 0.1) for the true caption of scene i and zero otherwise, or,
    with ``blind``, right for both captions (it does not read the relation)."""
    num_timesteps = 1000

    def __init__(self, num, colors, blind=False):
        from ldm.data.shapes import ShapesDataset, scene_to_prompt_spec
        from ldm.eval.probe import relation_captions

        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        data = ShapesDataset(num, seed=0, kinds=["relation"], split="eval")
        self.z = torch.stack([self.encode_first_stage(data[i]["image"][None])[0] for i in range(num)])
        pairs = [relation_captions(scene_to_prompt_spec(data.scene(i)[0]), i, colors) for i in range(num)]
        self.index = {caps[k]: i for i, caps in enumerate(pairs) for k in ((0, 1) if blind else (0,))}

    def encode_first_stage(self, x, sample=False):
        return torch.nn.functional.avg_pool2d(x, 4)

    def get_learned_conditioning(self, c):  # a list of prompts, or a batch dict (as LatentDiffusion)
        captions = c["txt"] if isinstance(c, dict) else c
        ids = torch.tensor([self.index.get(caption, -1) for caption in captions]).view(-1, 1, 1)
        return {"crossattn": ids} if isinstance(c, dict) else ids

    def denoiser(self):
        stub = self

        class D:
            def t_to_sigma(self, t):
                return t / 100.0

            def __call__(self, x, sigma, cond):
                idx = cond["crossattn"].view(-1)
                out = torch.zeros_like(x)
                for row, i in enumerate(idx.tolist()):
                    if i >= 0:
                        out[row] = stub.z[i] + 0.1
                return out
        return D()


@pytest.mark.parametrize("colors", [True, False])
def test_relation_probe_tells_a_model_that_uses_relations_from_one_that_does_not(colors):
    from ldm.eval.probe import format_probe, relation_probe

    uses = relation_probe(_ProbeStub(6, colors), num=6, timesteps=[999, 500], colors=colors, batch_size=4)
    assert [r["t"] for r in uses] == [999, 500]
    assert all(r["true"] == pytest.approx(0.01) and r["ratio"] > 5 for r in uses)
    assert all(r["no_signal"] == pytest.approx(r["true"]) for r in uses)  # the stub ignores its input
    blind = relation_probe(_ProbeStub(6, colors, blind=True), num=6, timesteps=[999], colors=colors)
    assert blind[0]["ratio"] == pytest.approx(1.0)
    assert "| 999 |" in format_probe(uses, 6, colors)
    with pytest.raises(ValueError, match="timesteps"):
        relation_probe(_ProbeStub(2, colors), num=2, timesteps=[1000])


@pytest.mark.parametrize("colors", [True, False])
def test_text_change_tells_a_tower_that_codes_relations_from_one_that_merged_them(colors):
    from ldm.eval.probe import text_change

    reads = text_change(_ProbeStub(5, colors), num=5, colors=colors)  # swapped / exchanged captions: index -1
    assert reads["relation"] > 0.5 and reads["shapes"] > 0.5
    merged = text_change(_ProbeStub(5, colors, blind=True), num=5, colors=colors)
    assert merged["relation"] == 0.0 and merged["shapes"] > 0.5


def test_cli_relations_runs_the_probe(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: SimpleNamespace(model=_ProbeStub(3, False)))
    out = tmp_path / "probe.md"
    rows = cli.main(["relations", "--ckpt", str(ckpt), "--num", "3", "--no-colors", "--timesteps", "999",
                     "--out", str(out)])
    assert len(rows) == 1 and rows[0]["ratio"] > 5 and "without colors" in out.read_text()
    assert "text encoder output, relative change: relation inverted" in out.read_text()
    with pytest.raises(SystemExit, match="timesteps"):
        cli.main(["relations", "--ckpt", str(ckpt), "--num", "3", "--timesteps", "5000"])
