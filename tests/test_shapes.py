import json
import random
import re

import numpy as np
import pytest
import torch

from ldm.data import shapes
from ldm.data.shapes import (BACKGROUND, COLORS, KINDS, MARGIN, RELATIONS, SHAPES, Scene, ShapeObject,
                             ShapesDataset, caption, caption_spec, render, sample_scene, scene_rng,
                             scene_to_prompt_spec, spec_to_scene)


def _scenes(n, seed=0, kind=None, split="train"):
    return [sample_scene(scene_rng(seed, i, split), kind) for i in range(n)]


def _box(o):
    r = o.radius
    return o.center[0] - r, o.center[1] - r, o.center[0] + r, o.center[1] + r


def test_palette_is_far_apart_and_far_from_background():
    colors = list(COLORS.values()) + [BACKGROUND]
    dists = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colors) for b in colors[i + 1:]]
    assert min(dists) > 100


@pytest.mark.parametrize("kind", KINDS)
def test_scenes_fit_without_overlap(kind):
    for scene in _scenes(150, kind=kind):
        assert scene.kind == kind
        boxes = [_box(o) for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert x0 >= MARGIN - 1e-3 and y0 >= MARGIN - 1e-3 and x1 <= 1 - MARGIN + 1e-3 and y1 <= 1 - MARGIN + 1e-3
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "objects overlap"


def test_scene_kinds_have_their_structure():
    for s in _scenes(60, kind="single"):
        assert len(s.objects) == 1
    counts = set()
    for s in _scenes(80, kind="counting"):
        counts.add(len(s.objects))
        assert len({(o.shape, o.color, o.size) for o in s.objects}) == 1
    assert counts == {1, 2, 3, 4}
    for s in _scenes(60, kind="color_attribution"):
        a, b = s.objects
        assert a.shape != b.shape and a.color != b.color
    for s in _scenes(60, kind="relation"):
        *subjects, ref = s.objects
        assert s.relation in RELATIONS and ref.shape not in {o.shape for o in subjects}
        assert all(shapes.relation_holds(s.relation, o.center, ref.center, 0.1) for o in subjects)
    with pytest.raises(ValueError, match="unknown scene kind"):
        sample_scene(random.Random(0), "spiral")


def test_render_sizes_and_pure_colors():
    scene = Scene("color_attribution", [ShapeObject("square", "red", "large", (0.3, 0.3)),
                                        ShapeObject("circle", "blue", "small", (0.75, 0.75))])
    for size in (32, 64, 100):
        img = np.asarray(render(scene, size))
        assert img.shape == (size, size, 3)
        assert tuple(img[1, size - 2]) == BACKGROUND
        assert tuple(img[int(0.3 * size), int(0.3 * size)]) == COLORS["red"]
        assert tuple(img[int(0.75 * size), int(0.75 * size)]) == COLORS["blue"]
    big = np.asarray(render(scene, 128))
    assert (big == COLORS["red"]).all(-1).sum() > 3.5 * (np.asarray(render(scene, 64)) == COLORS["red"]).all(-1).sum()
    with pytest.raises(ValueError, match=">= 32"):
        render(scene, 16)


def test_captions_are_deterministic_and_varied():
    scene = sample_scene(random.Random(3), "relation")
    assert caption(scene, random.Random(7)) == caption(scene, random.Random(7))
    assert len({caption(scene, random.Random(i)) for i in range(40)}) > 5
    ds = ShapesDataset(30, seed=4)
    assert [ds.scene(i)[1] for i in range(30)] == [ShapesDataset(30, seed=4).scene(i)[1] for i in range(30)]


def test_captions_cover_the_vocabulary():
    text = " ".join(caption(s, scene_rng(0, i)) for i, s in enumerate(_scenes(600)))
    words = list(COLORS) + list(SHAPES) + list(RELATIONS) + ["small", "large", "one", "two", "three", "four"]
    missing = [w for w in words if not re.search(rf"\b{w}", text)]
    assert not missing
    assert {"1", "2", "3", "4"} <= set(re.findall(r"\b\d\b", text))


def test_counting_captions_say_the_count():
    styles = set()
    for i, scene in enumerate(_scenes(200, kind="counting")):
        n = len(scene.objects)
        text = caption(scene, scene_rng(0, i))
        said = {shapes.COUNT_WORDS[n], str(n)} | ({"a", "an"} if n == 1 else set())
        first = [w for w in text.split() if w in said]
        assert first, text
        styles.add("digit" if first[0].isdigit() else "word")
        assert (scene.objects[0].shape + "s" in text) == (n > 1), text
    assert styles == {"digit", "word"}


def test_color_drop_sets_the_share_of_color_free_captions():
    def colorless_share(**kw):
        ds = ShapesDataset(400, seed=5, **kw)
        return sum(not any(re.search(rf"\b{c}\b", ds.scene(i)[1]) for c in COLORS) for i in range(400)) / 400

    assert 0.08 < colorless_share() < 0.22  # the default, 15%
    assert 0.33 < colorless_share(color_drop=0.4) < 0.47
    assert colorless_share(color_drop=0.0) == 0.0 and colorless_share(color_drop=1.0) == 1.0
    # the scenes (pictures) do not depend on it: only the wording does
    assert ShapesDataset(20, seed=5).scene(7)[0] == ShapesDataset(20, seed=5, color_drop=0.9).scene(7)[0]
    with pytest.raises(ValueError, match="color_drop"):
        ShapesDataset(4, color_drop=1.5)


def test_caption_examples():
    spec = {"objects": [{"shape": "circle", "color": "red", "size": "small", "count": 2},
                        {"shape": "square", "color": "blue", "size": None, "count": 1}],
            "relation": {"type": "above", "subject": 0, "reference": 1}}
    texts = {caption_spec(spec, random.Random(i)) for i in range(300)}
    assert "two small red circles above a blue square" in texts
    assert "a blue square below two small red circles" in texts
    single = {"objects": [{"shape": "circle", "color": "orange", "size": None, "count": 1}], "relation": None}
    assert any(t.startswith("an orange circle") for t in (caption_spec(single, random.Random(i)) for i in range(20)))


def test_spec_roundtrip():
    for i, scene in enumerate(_scenes(200)):
        spec = scene_to_prompt_spec(scene)
        again = spec_to_scene(json.loads(json.dumps(spec)), random.Random(i))
        assert scene_to_prompt_spec(again) == spec
        assert again.kind == shapes.spec_kind(spec)  # a count of one reads as a single object
        assert again.kind == scene.kind or (scene.kind, len(scene.objects)) == ("counting", 1)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    with pytest.raises(ValueError, match="shape"):
        spec_to_scene({"objects": [{"shape": "hexagon", "color": None, "size": None, "count": 1}]}, random.Random(0))


def test_dataset_items_are_deterministic_tensors():
    ds = ShapesDataset(12, size=32, seed=1)
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(item["image"], ShapesDataset(12, size=32, seed=1)[5]["image"])
    assert item["caption"] == ShapesDataset(40, size=32, seed=1)[5]["caption"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([ds[i]["image"] for i in range(12)]))
    other = [ShapesDataset(12, seed=2).scene(i)[1] for i in range(12)]
    held_out = [ShapesDataset(12, seed=1, split="eval").scene(i)[1] for i in range(12)]
    train = [ds.scene(i)[1] for i in range(12)]
    assert other != train and held_out != train


def test_dataset_kinds_and_errors():
    ds = ShapesDataset(20, kinds=["counting"])
    assert {ds.scene(i)[0].kind for i in range(20)} == {"counting"}
    with pytest.raises(ValueError, match="unknown scene kind"):
        ShapesDataset(5, kinds=["spiral"])
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(5, size=8)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, split="test")
    with pytest.raises(IndexError):
        ds[20]


def test_write_and_read_shards(tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    paths = shapes.main(["--out", str(out), "--num", "5", "--shard-size", "3", "--size", "32", "--seed", "9"])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["shapes-000000.tar", "shapes-000001.tar"]
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(5)]
    ds = ShapesDataset(5, size=32, seed=9)
    for i, s in enumerate(samples):
        scene, text = ds.scene(i)
        assert s["txt"] == text
        assert Scene.from_dict(s["json"]) == scene
        assert np.array_equal(np.asarray(s["png"]), np.asarray(render(scene, 32)))


@pytest.mark.parametrize("argv, message", [
    (["--num", "0"], "must be >= 1"),
    (["--num", "3", "--shard-size", "x"], "not an integer"),
    (["--num", "3", "--size", "16"], "too small"),
])
def test_shard_cli_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        shapes.main(["--out", str(tmp_path)] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_shard_cli_rejects_file_as_out(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(target), "--num", "2"])
    assert "is a file" in capsys.readouterr().err
