"""Paraphrased captions (ldm.data.paraphrase), "next_to" relations, and geneval's prompt file / paraphrased set."""
import json
import random
import re
from types import SimpleNamespace

import pytest

from ldm.data.paraphrase import paraphrase_spec, text_tokens
from ldm.data.shapes import (COUNT_WORDS, NEXT_TO, Scene, ShapeObject, ShapesDataset, caption, render,
                             sample_scene, scene_rng, scene_to_prompt_spec, spec_to_scene)
from ldm.eval import cli
from ldm.eval.analyzer import analyze
from ldm.eval.geneval import (CATEGORIES, failure_cause, make_paraphrased_prompts, read_prompts_file, score)


def _paraphrases(n, seed=0, color_drop=0.3):
    """(scene, its full spec, the said spec, text) for n training scenes, colors and sizes sometimes dropped."""
    out = []
    for i in range(n):
        rng = scene_rng(seed, i)
        scene = sample_scene(rng)
        spec = scene_to_prompt_spec(scene)
        for g in spec["objects"]:
            if rng.random() < color_drop:
                g["color"] = None
            if rng.random() < 0.5:
                g["size"] = None
        text, said = paraphrase_spec(spec, rng)
        out.append((scene, spec, said, text))
    return out


def test_each_paraphrase_states_the_scene_spec_and_the_scene_satisfies_it():
    for scene, spec, said, text in _paraphrases(300):
        relation = spec["relation"]
        if said["relation"] is not None and said["relation"]["type"] == NEXT_TO:
            assert relation["type"] in ("left of", "right of") and re.search(r"next to|beside|side of|along", text)
            said = dict(said, relation=dict(said["relation"], type=relation["type"]))
        assert said == spec, text
        # the rendered scene itself passes the said spec, as the analyzer sees it
        assert score(paraphrase_spec(spec, random.Random(1))[1], analyze(render(scene))), text


def test_paraphrases_name_every_object_with_its_count_color_and_shape():
    for _, spec, said, text in _paraphrases(300):
        for g in said["objects"]:
            n = g["count"]
            noun = g["shape"] if n == 1 else g["shape"] + "s"
            assert re.search(rf"\b{noun}\b", text), text
            if n > 1:
                assert re.search(rf"\b({COUNT_WORDS[n]}|{n})\b", text), text
            if g["color"]:
                assert g["color"] in text, text


def test_paraphrases_use_digits_number_words_and_the_new_wordings():
    texts = [t for *_, t in _paraphrases(1500)]
    joined = "\n".join(texts)
    for needle in (r"\b[234] \w+ (circles|squares|triangles)", r"\b(two|three|four) ", "a single ", " colored ",
                   r" in (red|green|blue|yellow|orange|purple|white|black)\b", "on a gray background",
                   "next to", "beside", "on top of", "beneath", "underneath", r"(?<!the )left of", "there are ",
                   r"with .* (above|below|over|under|beneath|left of|right of) it", "-colored"):
        assert re.search(needle, joined), needle
    assert len(set(texts)) > 0.8 * len(texts)


def test_next_to_only_for_left_and_right():
    seen = set()
    for _, spec, said, _ in _paraphrases(600):
        if said["relation"] and said["relation"]["type"] == NEXT_TO:
            seen.add(spec["relation"]["type"])
    assert seen == {"left of", "right of"}


def test_paraphrases_fit_the_demo_tower_and_the_token_count_is_right():
    from ldm.models.text_encoder import OpenCLIPTextEncoder

    tower = OpenCLIPTextEncoder("ldm-small-text", layer="last", pad="zero", max_length=20, projection=False)
    texts = [t for *_, t in _paraphrases(400, color_drop=0.0)]
    for t in texts:
        assert text_tokens(t) == len(tower.tokenizer.encode(t)) + 2, t
        assert text_tokens(t) <= 20, t


def test_paraphrase_share_and_default_captions_unchanged():
    # the captions of the default dataset (paraphrase 0) are those of before the option existed
    before = ['one large orange triangle is under two small green squares', 'two circles are above a square',
              'a picture of one small orange circle and a large black triangle', 'one square is below one triangle',
              'a picture of 1 purple circle with 1 yellow square', 'a large blue square over two small black triangles',
              'a small blue triangle', '1 small orange square under 1 small white circle']
    data = ShapesDataset(8, seed=3, color_drop=0.4)
    assert [data.scene(i)[1] for i in range(8)] == before
    assert [ShapesDataset(8, seed=3, color_drop=0.4, paraphrase=0.0).scene(i)[1] for i in range(8)] == before
    # words only paraphrases use: half as often at paraphrase 0.5 as at 1.0, never at 0
    marker = re.compile(r"colored| in [a-z]+$| in [a-z]+ |a single|just one|beside|on top of|^there |drawing|plus|"
                        r"exactly|group|little|big|gray picture|against|on gray|showing|higher|underneath|side of|"
                        r"alongside|also|well as|together")
    rate = {p: sum(bool(marker.search(ShapesDataset(600, seed=3, paraphrase=p).scene(i)[1])) for i in range(600))
            for p in (0.0, 0.5, 1.0)}
    assert rate[0.0] == 0 and 0.4 < rate[0.5] / rate[1.0] < 0.6 and rate[1.0] > 400
    scene = sample_scene(scene_rng(0, 1))
    assert caption(scene, random.Random(4), paraphrase=1.0) == caption(scene, random.Random(4), paraphrase=1.0)
    with pytest.raises(ValueError, match="paraphrase must be a probability"):
        ShapesDataset(4, paraphrase=1.5)


def _two(shape_a, xa, ya, shape_b, xb, yb):
    return Scene("relation", [ShapeObject(shape_a, "red", "small", (xa, ya)),
                              ShapeObject(shape_b, "blue", "small", (xb, yb))], None)


@pytest.mark.parametrize("layout, ok", [((0.25, 0.5, 0.75, 0.5), True), ((0.75, 0.5, 0.25, 0.5), True),
                                        ((0.5, 0.25, 0.5, 0.75), False)])
def test_next_to_scores_either_side_but_not_above(layout, ok):
    xa, ya, xb, yb = layout
    spec = {"category": "position", "objects": [{"shape": "circle", "color": None, "size": None, "count": 1},
                                                {"shape": "square", "color": None, "size": None, "count": 1}],
            "relation": {"type": NEXT_TO, "subject": 0, "reference": 1}}
    found = analyze(render(_two("circle", xa, ya, "square", xb, yb)))
    assert score(spec, found) is ok
    if not ok:
        assert failure_cause(spec, found) == "wrong position"
    assert score(spec, analyze(render(spec_to_scene(spec, random.Random(2)))))  # a scene drawn from it passes


def test_paraphrased_eval_prompts_are_held_out_balanced_and_true():
    prompts = make_paraphrased_prompts(4, seed=5)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(4)]
    assert prompts == make_paraphrased_prompts(4, seed=5)
    for p in prompts:
        assert p.spec["category"] == p.category
        assert score(p.spec, analyze(render(spec_to_scene(p.spec, random.Random(0))))), p.prompt


# ------------------------------------------------------------------------------------------------ --prompts-file
_GOOD = {"category": "position", "prompt": "a circle beside a square",
         "spec": {"objects": [{"shape": "circle", "color": None, "size": None, "count": 1},
                              {"shape": "square", "color": None, "size": None, "count": 1}],
                  "relation": {"type": "next_to", "subject": 0, "reference": 1}}}


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"prompt": "x", "spec": _GOOD["spec"]}), 'line 2: needs an object with "category"'),
    (json.dumps(dict(_GOOD, prompt="")), 'line 2: "prompt" must be a non-empty string'),
    (json.dumps(dict(_GOOD, spec={"objects": [{"shape": "hexagon", "count": 1}]})), "line 2: spec['objects'][0]['shape']"),
    (json.dumps(dict(_GOOD, spec=dict(_GOOD["spec"], relation={"type": "near", "subject": 0, "reference": 1}))),
     "line 2: spec['relation']['type'] = 'near'"),
    (json.dumps(dict(_GOOD, spec=[1])), 'line 2: "spec" must be an object'),
])
def test_prompts_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{message.split(':')[0].split()[-1]}")) as e:
        read_prompts_file(str(path))
    assert message.split(": ", 1)[1] in str(e.value) and "\n" not in str(e.value)


def test_cli_geneval_scores_a_prompts_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.jsonl"
    counting = {"category": "counting", "prompt": "3 squares",
                "spec": {"objects": [{"shape": "square", "color": None, "size": None, "count": 3}], "relation": None}}
    path.write_text(json.dumps(_GOOD) + "\n\n" + json.dumps(counting) + "\n")
    prompts = read_prompts_file(str(path))
    assert [p.category for p in prompts] == ["position", "counting"] and prompts[1].spec["category"] == "counting"
    specs = {p.prompt: p.spec for p in prompts + make_paraphrased_prompts(1, seed=0)}

    def fake(prompts, negative_prompts=None, *, seeds, height, width, **options):
        return SimpleNamespace(images=[render(spec_to_scene(specs[p], random.Random(s)), height)
                                       for p, s in zip(prompts, seeds)])

    monkeypatch.setattr(cli, "_load_pipeline", lambda args: fake)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    report = cli.main(["geneval", "--ckpt", str(ckpt), "--prompts-file", str(path), "--images-per-prompt", "2"])
    assert report["overall"] == 1.0 and report["num_images"] == 4 and list(report["categories"]) == ["position",
                                                                                                    "counting"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: needs an object"):
        cli.main(["geneval", "--ckpt", str(ckpt), "--prompts-file", str(bad)])
    with pytest.raises(SystemExit):
        cli.main(["geneval", "--ckpt", str(ckpt), "--prompts-file", str(tmp_path / "none.jsonl")])
    assert "--prompts-file" in capsys.readouterr().err
    paraphrased = cli.main(["geneval", "--ckpt", str(ckpt), "--paraphrase", "--n", "1", "--images-per-prompt", "1"])
    assert paraphrased["num_images"] == 6 and paraphrased["overall"] == 1.0
