"""The shapes-demo recipe: its training scripts (weighted autoencoder fine-tuning, contrastive text-tower
pretraining) and train.sh's chain of commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parent
ROOT = RECIPE.parents[1]
sys.path.insert(0, str(RECIPE))

import finetune_decoder  # noqa: E402
import pretrain_text_tower  # noqa: E402
from ldm.data.shapes import BACKGROUND, Scene, ShapeObject, image_to_tensor, render  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402

TINY_DD = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _picture() -> torch.Tensor:
    return image_to_tensor(render(Scene("single", [ShapeObject("circle", "red", "large", (0.5, 0.5))])))[None]


def test_pixel_weights_mark_the_object_only():
    x = _picture()
    w = finetune_decoder.pixel_weights(x, 10.0)
    assert w.shape == (1, 1, 64, 64)
    assert w[0, 0, 32, 32] == 10.0 and w[0, 0, 0, 0] == 1.0
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1
    assert torch.equal(finetune_decoder.pixel_weights(bg, 10.0), torch.ones(1, 1, 64, 64))


@pytest.mark.parametrize("train_encoder", [False, True])
def test_reconstruction_loss_trains_the_chosen_parts(train_encoder):
    ae = AutoencoderKL(TINY_DD, embed_dim=4)
    params = list(ae.parameters()) if train_encoder else finetune_decoder.decoder_parameters(ae)
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss = finetune_decoder.reconstruction_loss(ae, _picture(), torch.Generator().manual_seed(0), 10.0,
                                                train_encoder)
    loss.backward()
    assert loss.item() > 0
    assert (ae.encoder.conv_in.weight.grad is not None) == train_encoder
    assert ae.decoder.conv_out.weight.grad is not None


def test_worst_pixels_error_is_the_mean_of_each_pictures_worst_pixels():
    per_pixel = torch.zeros(2, 1, 10, 10)
    per_pixel[0, 0, 3, 4] = 5.0  # one bad pixel: the worst 1% of 100
    per_pixel[1, 0, :2] = 1.0  # 20 bad pixels: the worst 10% all at 1
    assert finetune_decoder.worst_pixels_error(per_pixel).item() == pytest.approx((5.0 + 1.0) / 2)
    assert finetune_decoder.worst_pixels_error(per_pixel, 0.1).item() == pytest.approx((0.5 + 1.0) / 2)


def test_worst_weight_adds_the_worst_pixels_to_the_loss():
    ae, x = AutoencoderKL(TINY_DD, embed_dim=4), _picture()
    plain = finetune_decoder.reconstruction_loss(ae, x, torch.Generator().manual_seed(0), 1.0, False)
    worst = finetune_decoder.reconstruction_loss(ae, x, torch.Generator().manual_seed(0), 1.0, False, 0.5)
    with torch.no_grad():
        err = ae.decode(ae.encode(x).sample(torch.Generator().manual_seed(0))) - x
    per_pixel = (err.square() + err.abs()).mean(dim=1, keepdim=True)
    assert plain.item() == pytest.approx(per_pixel.mean().item(), rel=1e-5)
    expected = per_pixel.mean() + 0.5 * per_pixel.flatten().topk(41).values.mean()  # 1% of 4096 pixels
    assert worst.item() == pytest.approx(expected.item(), rel=1e-5)


def test_finetune_of_a_whole_model_replaces_its_decoder_only(tmp_path):
    from ldm.io import read_state_dict, save_checkpoint
    from ldm.config import instantiate_from_config, load_config

    cfg = load_config(RECIPE / "shapes_demo.yaml")
    cfg.model.params.first_stage_ckpt = None
    model = instantiate_from_config(cfg.model)
    src, out = tmp_path / "model.safetensors", tmp_path / "model_ft.safetensors"
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    save_checkpoint(sd, src, metadata={"config": "{\"x\": 1}"}, dtype=torch.float16)
    args = ["--ckpt", str(src), "--steps", "1", "--batch-size", "2", "--num-train", "4", "--num-val", "2"]
    finetune_decoder.main(args + ["--out", str(out), "--worst-weight", "0.5"])
    before, _ = read_state_dict(src)
    after, meta = read_state_dict(out)
    assert meta == {"config": '{"x": 1}'} and set(after) == set(before)
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))
                           for k in changed)
    with pytest.raises(SystemExit, match="latent space"):
        finetune_decoder.main(args + ["--out", str(out), "--train-encoder"])


def test_finetune_rejects_object_weight_below_one(tmp_path):
    with pytest.raises(SystemExit, match="object-weight"):
        finetune_decoder.main(["--ckpt", "x", "--out", str(tmp_path / "y"), "--object-weight", "0.5"])
    with pytest.raises(SystemExit, match="worst-weight"):
        finetune_decoder.main(["--ckpt", "x", "--out", str(tmp_path / "y"), "--worst-weight", "-1"])
    with pytest.raises(SystemExit, match="checkpoint not found: .*nope.safetensors"):  # one line, the path named
        finetune_decoder.main(["--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "y")])


def test_contrastive_loss_prefers_the_matching_caption_over_the_inverted_one():
    img = torch.eye(3, 8)
    txt = torch.eye(3, 8)
    neg = torch.eye(3, 8)[:1] * -1  # image 0's inverted caption: pointing away
    good = pretrain_text_tower.contrastive_loss(img, txt, neg, torch.tensor([0]), torch.tensor(10.0))
    bad = pretrain_text_tower.contrastive_loss(img, txt, img[:1], torch.tensor([0]), torch.tensor(10.0))
    assert good < bad  # an inverted caption coded like the true one costs


def test_pretrain_text_tower_runs_and_writes_the_tower(tmp_path):
    from ldm.io import read_state_dict

    out = tmp_path / "tower.safetensors"
    report = pretrain_text_tower.main(["--steps", "2", "--batch-size", "4", "--num-train", "16", "--out", str(out)])
    assert set(report) == {"relation_accuracy", "text_change_relation", "text_change_shapes"}
    assert 0.0 <= report["relation_accuracy"] <= 1.0 and report["text_change_shapes"] > 0
    state, _ = read_state_dict(out)
    assert "cond_stage_model.model.token_embedding.weight" in state
    with pytest.raises(SystemExit, match="--steps"):
        pretrain_text_tower.main(["--steps", "0", "--out", str(out)])
    from ldm.io import save_checkpoint

    other = tmp_path / "no_tower.safetensors"
    save_checkpoint({"first_stage_model.x": torch.zeros(1)}, other)
    with pytest.raises(SystemExit, match="no cond_stage_model"):  # a file without a text tower
        pretrain_text_tower.main(["--steps", "1", "--init", str(other), "--out", str(out)])
    with pytest.raises((SystemExit, FileNotFoundError, ValueError), match="missing.safetensors"):
        pretrain_text_tower.main(["--steps", "1", "--init", str(tmp_path / "missing.safetensors"), "--out", str(out)])


def test_color_swapped_captions_exchange_only_the_colors():
    spec = {"objects": [{"shape": "circle", "color": "red", "size": None, "count": 1},
                        {"shape": "square", "color": "blue", "size": None, "count": 1}], "relation": None}
    true, swapped = pretrain_text_tower.color_swapped_captions(spec, seed=3)
    assert "red circle" in true and "blue square" in true
    assert "blue circle" in swapped and "red square" in swapped
    assert true.replace("red", "X").replace("blue", "red").replace("X", "blue") == swapped


def test_pretrain_text_tower_with_color_swaps_reports_them(tmp_path):
    report = pretrain_text_tower.main(["--steps", "2", "--batch-size", "8", "--num-train", "16", "--color-swaps",
                                       "--out", str(tmp_path / "tower.safetensors")])
    assert 0.0 <= report["color_accuracy"] <= 1.0


def test_shape_swapped_captions_exchange_only_the_shapes():
    spec = {"objects": [{"shape": "circle", "color": "red", "size": None, "count": 2},
                        {"shape": "square", "color": "blue", "size": None, "count": 1}],
            "relation": {"type": "below", "subject": 0, "reference": 1}}
    true, swapped = pretrain_text_tower.shape_swapped_captions(spec, seed=3)
    assert "red circles" in true and "blue square" in true
    assert "red squares" in swapped and "blue circle" in swapped
    assert true.replace("circle", "X").replace("square", "circle").replace("X", "square") == swapped


def test_batch_gives_relation_pictures_shape_swapped_and_paraphrased_negatives():
    import random
    import re

    from ldm.data.shapes import ShapesDataset

    data = ShapesDataset(64, kinds=["relation", "color_attribution"])
    _, caps, negs = pretrain_text_tower.batch(data, range(64), random.Random(0), color_swaps=True,
                                              shape_swaps=True, paraphrase=1.0)
    kinds = [data.scene(i)[0].kind for i in range(64)]
    assert all(set(n) <= {"relation", "shapes"} and "shapes" in n for n, k in zip(negs, kinds) if k == "relation")
    assert all(set(n) == {"colors"} for n, k in zip(negs, kinds) if k == "color_attribution")
    def words(text):  # the words, plurals made singular
        return sorted(re.sub(r"(circle|square|triangle)s\b", r"\1", text.replace(",", " ")).split())

    for cap, n in zip(caps, negs):
        assert all(other != cap for other in n.values())
        if "shapes" in n:  # worded alike: the same words, the two shape nouns exchanged
            assert words(cap) == words(n["shapes"])
    # without the new options the negatives are the ones of before: the relation inverted only
    _, _, plain = pretrain_text_tower.batch(data, range(64), random.Random(0), color_swaps=True)
    assert all(set(n) == ({"relation"} if k == "relation" else {"colors"}) for n, k in zip(plain, kinds))


def test_batch_twice_negatives_name_the_first_shape_twice():
    import random

    from ldm.data.shapes import ShapesDataset

    data = ShapesDataset(64, kinds=["relation", "color_attribution", "single"])
    _, caps, negs = pretrain_text_tower.batch(data, range(64), random.Random(0), color_swaps=True,
                                              shape_swaps=True, twice=True)
    scenes = [data.scene(i)[0] for i in range(64)]
    two_shapes = [len({o.shape for o in s.objects}) == 2 and s.kind != "single" for s in scenes]
    assert any(two_shapes) and all(("twice" in n) == t for n, t in zip(negs, two_shapes))
    for s, cap, n in zip(scenes, caps, negs):
        if "twice" in n:
            first, second = (o.shape for o in s.objects[:2]) if s.relation is None else (None, None)
            assert n["twice"] != cap
            if first:  # color attribution: the second shape's word is gone, the first one's said twice
                assert second in cap and second not in n["twice"] and n["twice"].count(first) == 2
    # some color-attribution captions go color-free (they keep the twice negative, lose the colors one)
    assert any("twice" in n and "colors" not in n for n, s in zip(negs, scenes) if s.kind == "color_attribution")
    _, _, plain = pretrain_text_tower.batch(data, range(64), random.Random(0), color_swaps=True, shape_swaps=True)
    assert not any("twice" in n for n in plain)


def test_pretrain_text_tower_with_twice_negatives_reports_them(tmp_path):
    report = pretrain_text_tower.main(["--steps", "2", "--batch-size", "8", "--num-train", "16", "--twice-negatives",
                                       "--out", str(tmp_path / "tower.safetensors")])
    assert 0.0 <= report["twice_accuracy"] <= 1.0


def test_pretrain_text_tower_with_shape_swaps_and_paraphrases_reports_them(tmp_path):
    report = pretrain_text_tower.main(["--steps", "2", "--batch-size", "8", "--num-train", "16", "--shape-swaps",
                                       "--paraphrase", "0.5", "--out", str(tmp_path / "tower.safetensors")])
    assert 0.0 <= report["shape_accuracy"] <= 1.0 and 0.0 <= report["paraphrased_relation_accuracy"] <= 1.0
    with pytest.raises(SystemExit, match="--paraphrase"):
        pretrain_text_tower.main(["--steps", "1", "--paraphrase", "2", "--out", str(tmp_path / "t.safetensors")])


# ---- train.sh, run with a stand-in `python` that records each command instead of running it ----------------------
FAKE_PYTHON = """#!{python}
import json, os, sys
if sys.argv[1] == "-c":  # train.sh reads the latent scale of a warm start's file
    print(0.25)
else:
    with open(os.environ["RECIPE_RECORD"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture(scope="module")
def recipe_commands(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """(LOGDIR, the argument lists of every python command train.sh runs, in order)."""
    tmp = tmp_path_factory.mktemp("recipe")
    (tmp / "bin").mkdir()
    fake = tmp / "bin" / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    record, logdir = tmp / "commands.jsonl", tmp / "logs"
    env = dict(os.environ, PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}", RECIPE_RECORD=str(record),
               LOGDIR=str(logdir))
    for name in ("SEED", "LDM_STEPS", "OMP_NUM_THREADS"):  # the recipe's defaults
        env.pop(name, None)
    subprocess.run(["bash", str(RECIPE / "train.sh")], cwd=tmp, env=env, check=True, capture_output=True, timeout=60)
    return logdir, [json.loads(line) for line in record.read_text().splitlines()]


def _train_py_config(argv: list[str]):
    from ldm.cli.train import _split_overrides, build_config, build_parser

    args = build_parser().parse_intermixed_args(argv)
    _split_overrides(args)
    return args, build_config(args, args.base)


def _files_read_and_written(argv: list[str]) -> tuple[set[str], set[str]]:
    """The model files one recorded command reads and the one it writes."""
    if argv[0] == "train.py":
        args, cfg = _train_py_config(argv[1:])
        params = cfg.model.params
        reads = {str(e.path) for e in params.get("init_from") or []}
        if params.get("first_stage_ckpt"):
            reads.add(str(params.first_stage_ckpt))
        return reads, {str(Path(args.logdir) / args.name / f"{args.name}.safetensors")}
    if argv[0].endswith("finetune_decoder.py"):
        args = finetune_decoder.build_parser().parse_args(argv[1:])
        return {args.ckpt}, {args.out}
    if argv[0].endswith("pretrain_text_tower.py"):
        args = pretrain_text_tower.build_parser().parse_args(argv[1:])
        return {args.init}, {args.out}
    assert argv[:3] == ["-m", "ldm.eval", "recon"], argv
    return {argv[argv.index("--ckpt") + 1]}, set()


def test_train_sh_runs_the_recipe_scripts_and_the_shipped_asset_last(recipe_commands):
    _, commands = recipe_commands
    scripts = [c[0] for c in commands]
    assert scripts.count("train.py") == 10
    for script in scripts:
        assert script in ("train.py", "-m") or (ROOT / script).is_file(), script
    assert commands[-2][commands[-2].index("--out") + 1] == "ldm/assets/demo/shapes.safetensors"
    for argv in commands:
        if argv[0] == "train.py":
            args, _ = _train_py_config(argv[1:])
            assert all((ROOT / base).is_file() for base in args.base), args.base


def test_train_sh_reads_only_files_an_earlier_step_wrote(recipe_commands):
    logdir, commands = recipe_commands
    written: set[str] = set()
    for argv in commands:
        reads, writes = _files_read_and_written(argv)
        assert reads <= written, f"{' '.join(argv)} reads {sorted(reads - written)} before any step writes it"
        written |= writes
    assert all(path.startswith(str(logdir)) for path in written - {"ldm/assets/demo/shapes.safetensors"})


def test_train_sh_warm_starts_name_the_parts_and_the_second_tower(recipe_commands):
    logdir, commands = recipe_commands
    inits = {}
    for argv in commands:
        if argv[0] == "train.py":
            args, cfg = _train_py_config(argv[1:])
            entries = cfg.model.params.get("init_from")
            inits[args.name] = [dict(e) for e in entries] if entries is not None else None
    assert inits["shapes_autoencoder"] is None and inits["shapes_demo"] is None
    cf = str(logdir / "shapes_demo_cf" / "shapes_demo_cf.safetensors")
    assert inits["v5_relations_a"] == [
        {"path": cf, "parts": ["unet"], "keep_new": True},
        {"path": str(logdir / "text_tower.safetensors"), "parts": ["text_encoder"]}]
    assert inits["v6_swaps_a"][1] == {"path": str(logdir / "text_tower_color_swaps.safetensors"),
                                      "parts": ["text_encoder"]}
    joint = str(logdir / "v6_joint" / "v6_joint.safetensors")
    assert inits["v6_counting"] == [{"path": joint, "parts": ["unet", "text_encoder"], "keep_new": False}]


def test_train_sh_configs_validate(recipe_commands):
    from ldm.cli.train import callback_nodes, validate

    _, commands = recipe_commands
    for argv in commands:
        if argv[0] == "train.py":
            args, cfg = _train_py_config(argv[1:])
            validate(cfg, callback_nodes(cfg, Path(args.logdir) / args.name, args.name))


def test_batch_count_negatives_change_the_count_by_one_and_color_moves_exchange_relation_colors():
    import random

    from ldm.data.shapes import COUNT_WORDS, MAX_COUNT, ShapesDataset

    numbers = {**{w: n for n, w in COUNT_WORDS.items()}, **{str(n): n for n in COUNT_WORDS}}

    def parse_count_words(caption):  # the first number named; none (a, an, a single) is one
        return next((numbers[w] for w in caption.replace(",", " ").split() if w in numbers), 1)

    data = ShapesDataset(96, kinds=["counting", "single", "relation"])
    scenes = [data.scene(i)[0] for i in range(96)]
    for paraphrase in (0.0, 1.0):
        _, caps, negs = pretrain_text_tower.batch(data, range(96), random.Random(0), shape_swaps=True,
                                                  paraphrase=paraphrase, counts=True, color_moves=True)
        seen_counts, moved = set(), 0
        for s, cap, n in zip(scenes, caps, negs):
            if s.kind in ("single", "counting"):
                assert set(n) == {"count"}
                asked, other = parse_count_words(cap), parse_count_words(n["count"])
                assert asked == len(s.objects) and abs(other - asked) == 1 and 1 <= other <= MAX_COUNT
                seen_counts.add(asked)
            else:
                # "relation" is left out where a paraphrase ("next to") reads the same either way
                assert "shapes" in n and set(n) <= {"relation", "shapes", "colors"}
                if "colors" in n:
                    moved += 1
                    a, b = s.objects[0].color, s.objects[-1].color
                    assert a != b and a in cap and b in cap and n["colors"] != cap
        assert seen_counts == set(range(1, MAX_COUNT + 1)) and moved > 5
    # without them the counting pictures have no negatives and the relations no color moves, as before
    _, _, plain = pretrain_text_tower.batch(data, range(96), random.Random(0), shape_swaps=True)
    assert all(not n if s.kind != "relation" else set(n) == {"relation", "shapes"} for s, n in zip(scenes, plain))
    with pytest.raises(ValueError, match="no 'more' negative"):
        pretrain_text_tower.changed_spec({"objects": [{"shape": "circle", "color": None, "size": None,
                                                       "count": MAX_COUNT}], "relation": None}, "more")


def test_anchor_keeps_the_tower_near_its_init(tmp_path):
    from ldm.io import read_state_dict

    init = tmp_path / "init.safetensors"
    pretrain_text_tower.main(["--steps", "1", "--batch-size", "4", "--num-train", "16", "--out", str(init)])
    base = ["--steps", "6", "--batch-size", "8", "--num-train", "32", "--lr", "5e-3", "--init", str(init),
            "--count-negatives", "--color-moves", "--seed", "3"]
    free = pretrain_text_tower.main(base + ["--out", str(tmp_path / "free.safetensors")])
    held = pretrain_text_tower.main(base + ["--anchor", "100", "--out", str(tmp_path / "held.safetensors")])
    assert 0.0 <= free["count_accuracy"] <= 1.0 and "anchor_change" not in free
    start = read_state_dict(init)[0]

    def moved(path):
        state = read_state_dict(path)[0]
        return sum((state[k].float() - start[k].float()).pow(2).sum().item() for k in start)

    assert held["anchor_change"] >= 0 and moved(tmp_path / "held.safetensors") < moved(tmp_path / "free.safetensors")
    with pytest.raises(SystemExit, match="--anchor .* needs --init"):
        pretrain_text_tower.main(["--steps", "1", "--anchor", "1", "--out", str(tmp_path / "x.safetensors")])
