"""Pivotal tuning: ``model.params.lora.tokens`` trains the token vectors of some words with the LoRA, exported as
A1111's bundled embeddings (``bundle_emb.<word>.*``) that load with the LoRA and give the trained model's
conditioning; prompts without the words encode as before. Tiny models as in test_train_lora.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.adapters.lora import load_lora, loaded_loras, split_bundled_embeddings, unload_loras
from ldm.adapters.lora_train import LoraNetwork, TokenVectors, bundled_embeddings, parse_lora_config
from ldm.convert import load_model
from ldm.config import instantiate_from_config
from ldm.io import read_state_dict
from ldm.models.text_encoder import _bpe_tokenizer
from ldm.pipeline import Text2Image
from ldm.training.callbacks import export_model
from test_train_ldm import tiny_data, tiny_model_node, trainer
from test_train_lora import base_file, lora_module  # noqa: F401  (the module-scoped base model fixture)


def test_parse_tokens_and_token_lr():
    config = parse_lora_config({"rank": 2, "targets": ["attn"], "tokens": ["star", "stars"], "token_lr": 0.01})
    assert config.tokens == ("star", "stars") and config.token_lr == 0.01
    assert parse_lora_config({"targets": [], "tokens": "star"}).tokens == ("star",)  # tokens alone: textual inversion
    for bad, fragment in (({"tokens": ["a star"]}, "tokens"), ({"tokens": [3]}, "tokens"),
                          ({"token_lr": 0.1}, "no tokens train"), ({"tokens": ["x"], "token_lr": -1}, "token_lr"),
                          ({"targets": []}, "non-empty")):
        with pytest.raises(ValueError, match=fragment):
            parse_lora_config(bad)


def test_token_vectors_replace_every_occurrence_of_a_multi_id_word():
    embedding = nn.Embedding(50, 3)
    words = {"ab": (7, 8), "c": (9,)}
    vectors = TokenVectors(embedding, tuple(words), lambda w: list(words[w]))
    assert torch.equal(vectors.vectors["ab"], embedding.weight[[7, 8]])
    with torch.no_grad():
        vectors.vectors["ab"].copy_(torch.tensor([[1.0, 1, 1], [2, 2, 2]]))
        vectors.vectors["c"].fill_(5)
    handle = embedding.register_forward_hook(vectors.hook)
    ids = torch.tensor([[7, 8, 1, 7, 8, 9], [8, 7, 2, 7, 3, 8]])  # "ab" twice and "c"; then only stray 7s and 8s
    out = embedding(ids)
    handle.remove()
    plain = embedding(ids)
    expected = plain.clone()
    expected[0, [0, 3]] = 1.0
    expected[0, [1, 4]] = 2.0
    expected[0, 5] = 5.0
    torch.testing.assert_close(out, expected)


def test_token_init_starts_a_word_from_the_mean_of_other_words():
    """lora.token_init / token_init: a word's vectors start from the mean embedding of other words (each word's ids
    averaged first), one copy per id of the word; bad entries are one-line errors naming the key."""
    embedding = nn.Embedding(50, 3)
    words = {"ab": (7, 8), "c": (9,), "x": (1,), "yz": (2, 3)}
    vectors = TokenVectors(embedding, ("ab", "c"), lambda w: list(words[w]), {"ab": ("x", "yz")})
    w = embedding.weight.detach()
    expected = (w[1] + (w[2] + w[3]) / 2) / 2
    torch.testing.assert_close(vectors.vectors["ab"], expected.expand(2, -1))
    assert torch.equal(vectors.vectors["c"], w[[9]])  # no init: the word's own row
    config = parse_lora_config({"tokens": ["star", "stars"], "targets": [],
                                "token_init": {"star": "circle", "stars": ["circles", "squares"]}})
    assert config.token_init == (("star", ("circle",)), ("stars", ("circles", "squares")))
    for bad, fragment in (({"tokens": ["star"], "token_init": {"moon": "circle"}}, "token_init.moon.*not one of"),
                          ({"tokens": ["star"], "token_init": {"star": []}}, "token_init.star"),
                          ({"tokens": ["star"], "token_init": {"star": ["a circle"]}}, "token_init.star"),
                          ({"tokens": ["star"], "token_init": ["circle"]}, "must be a mapping")):
        with pytest.raises(ValueError, match=fragment):
            parse_lora_config(bad)


def test_token_init_in_a_lora_run_and_a_full_fine_tune(base_file):  # noqa: F811
    from test_train_ldm import tiny_module

    encode = _bpe_tokenizer().encode
    module = lora_module(base_file, targets=["attn"], tokens=["star"], token_init={"star": ["circle", "square"]})
    table = module.conditioner.embedders[0].model.token_embedding.weight.detach()
    expected = (table[encode("circle")].mean(0) + table[encode("square")].mean(0)) / 2
    torch.testing.assert_close(module.lora.tokens[0].vectors["star"][0], expected)

    full = tiny_module(init_from=str(base_file), train_tokens=["star"], token_init={"star": "circle"})
    table = full.conditioner.embedders[0].model.token_embedding.weight.detach()
    torch.testing.assert_close(table[encode("star")], table[encode("circle")])
    base = load_model(None, base_file).conditioner.embedders[0].model.token_embedding.weight
    changed = (table != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == encode("star")  # the word's row alone was set
    with pytest.raises(ValueError, match="token_init.moon"):
        tiny_module(init_from=str(base_file), train_tokens=["star"], token_init={"moon": "circle"})


def test_tokens_train_with_their_own_rate_and_leave_other_prompts_alone(tmp_path, base_file):  # noqa: F811
    word = "circle"  # a word of the tiny shapes captions
    module = lora_module(base_file, targets=["attn"], tokens=[word], token_lr=0.05)
    before = module.lora.tokens[0].vectors[word].detach().clone()
    table = module.conditioner.embedders[0].model.token_embedding.weight.detach().clone()
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 0.05]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["params"] == module.lora.token_parameters()
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data())
    after = module.lora.tokens[0].vectors[word].detach()
    assert not torch.allclose(after, before)
    assert torch.equal(module.conditioner.embedders[0].model.token_embedding.weight, table)

    base = load_model(None, base_file)
    module.eval()
    with torch.no_grad():
        other = {"txt": ["a red square", "two blue triangles"]}
        torch.testing.assert_close(module.conditioning({"caption": other["txt"]})["crossattn"],
                                   base.get_learned_conditioning(other)["crossattn"], atol=1e-6, rtol=1e-6)
        named = {"txt": ["a red circle"]}
        assert not torch.allclose(module.conditioning({"caption": named["txt"]})["crossattn"],
                                  base.get_learned_conditioning(named)["crossattn"], atol=1e-4)


def test_export_bundles_the_words_and_the_pipeline_uses_them_with_the_lora(tmp_path, base_file):  # noqa: F811
    lora = {"rank": 4, "alpha": 2.0, "targets": ["attn", "ff"], "tokens": ["circle", "circles"], "token_lr": 0.05}
    module = lora_module(base_file, **lora)
    module.run_config = {"model": tiny_model_node(init_from=str(base_file), lora=lora),
                         "data": {"params": {"batch_size": 4, "size": 32}}, "seed": 0}
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data())
    path = export_model(module, tmp_path / "shape.safetensors", use_ema=False)
    state, _ = read_state_dict(path)
    assert {k for k in state if k.startswith("bundle_emb.")} == {"bundle_emb.circle.string_to_param.*",
                                                                "bundle_emb.circles.string_to_param.*"}
    ids = _bpe_tokenizer().encode("circle")
    assert state["bundle_emb.circle.string_to_param.*"].shape == (len(ids), module.conditioner.embedders[0].width)

    module.eval()
    prompts = ["a red circle above two blue circles", "a green square"]
    with torch.no_grad():
        expected = module.conditioning({"caption": prompts})["crossattn"]
    pipe = Text2Image.from_checkpoint(base_file)
    plain = pipe.encode_prompts(prompts)["crossattn"]
    pipe.load_lora(path)
    assert {"circle", "circles"} <= {e.name for e in pipe.embeddings}
    torch.testing.assert_close(pipe.encode_prompts(prompts)["crossattn"], expected, atol=1e-5, rtol=1e-5)
    pipe.unload_loras()
    assert len(pipe.embeddings) == 0
    torch.testing.assert_close(pipe.encode_prompts(prompts)["crossattn"], plain)

    # a file embedding of the same word is hidden while the LoRA is loaded, and back afterwards
    own = tmp_path / "circle.safetensors"
    save_file({"emb_params": torch.zeros(1, module.conditioner.embedders[0].width)}, str(own))
    mine = pipe.load_embedding(own)
    pipe.load_lora(path)
    assert pipe.embeddings["circle"] is not mine
    torch.testing.assert_close(pipe.encode_prompts(prompts)["crossattn"], expected, atol=1e-5, rtol=1e-5)
    pipe.unload_loras()
    assert pipe.embeddings["circle"] is mine and "circles" not in pipe.embeddings


def test_a_file_of_bundled_embeddings_only_loads_and_a_misfit_is_refused(tmp_path, base_file):  # noqa: F811
    model = load_model(None, base_file)
    width = model.conditioner.embedders[0].width
    only = tmp_path / "ti_only.safetensors"
    save_file({"bundle_emb.zork.string_to_param.*": torch.randn(2, width)}, str(only))
    loaded = load_lora(model, only)
    assert [e.name for e in loaded.embeddings] == ["zork"] and loaded_loras(model) == [loaded]
    unload_loras(model)
    misfit = tmp_path / "misfit.safetensors"
    save_file({"bundle_emb.zork.string_to_param.*": torch.randn(2, width + 1)}, str(misfit))
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(model, misfit)
    assert loaded_loras(model) == []
    rest, embeddings = split_bundled_embeddings({"a.lora_up.weight": torch.zeros(1), "bundle_emb.x.clip_l":
                                                 torch.zeros(1, 4), "bundle_emb.x.clip_g": torch.zeros(1, 8)})
    assert list(rest) == ["a.lora_up.weight"] and embeddings[0].widths == [4, 8]


def test_sdxl_like_model_bundles_one_vector_set_per_text_encoder():
    from test_lora import tiny_sdxl_like

    model = tiny_sdxl_like()
    network = LoraNetwork(model, parse_lora_config({"rank": 2, "targets": ["attn"], "tokens": ["star"]}))
    assert len(network.tokens) == 2
    bundle = bundled_embeddings(network.state_dict())
    assert set(bundle) == {"bundle_emb.star.clip_l", "bundle_emb.star.clip_g"}
    widths = [e.width for e in model.conditioner.embedders if hasattr(e, "tokenize_prompts")]
    assert [bundle["bundle_emb.star.clip_l"].shape[1], bundle["bundle_emb.star.clip_g"].shape[1]] == widths


def test_full_fine_tune_trains_only_the_words_rows_of_the_embedding_table(tmp_path, base_file):  # noqa: F811
    from test_train_ldm import tiny_module

    module = tiny_module(init_from=str(base_file), train_tokens=["circle"], token_lr=0.05)
    table = module.conditioner.embedders[0].model.token_embedding.weight
    before, unet_before = table.detach().clone(), module.model.diffusion_model.out[2].weight.detach().clone()
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[1]["params"] == [table] and optimizer.param_groups[1]["lr"] == 0.05
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data())
    changed = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == _bpe_tokenizer().encode("circle")  # that row alone (the captions name squares etc. too)
    assert not torch.equal(module.model.diffusion_model.out[2].weight, unet_before)
    tower = module.conditioner.embedders[0].model
    assert all(not p.requires_grad for n, p in tower.named_parameters() if n != "token_embedding.weight")

    path = export_model(module, tmp_path / "ft.safetensors")
    exported = load_model(None, path)
    base = load_model(None, base_file)
    with torch.no_grad():
        other, named = {"txt": ["two blue squares"]}, {"txt": ["a red circle"]}
        torch.testing.assert_close(exported.get_learned_conditioning(other)["crossattn"],
                                   base.get_learned_conditioning(other)["crossattn"])
        assert not torch.allclose(exported.get_learned_conditioning(named)["crossattn"],
                                  base.get_learned_conditioning(named)["crossattn"], atol=1e-4)


@pytest.mark.parametrize("params, fragment", [
    ({"train_tokens": ["star"], "lora": {"rank": 2}}, "lora.tokens"),
    ({"token_lr": 0.1}, "no tokens train"),
    ({"train_tokens": ["two words"]}, "list of words"),
    ({"text_lr": 1e-5}, "no text encoder trains"),
    ({"text_lr": 1e-5, "lora": {"rank": 2}}, "full fine-tune"),
    ({"text_lr": 0}, "must be > 0"),
])
def test_bad_train_tokens_settings_are_one_line_errors(params, fragment):
    from test_train_ldm import tiny_module

    with pytest.raises(ValueError, match=fragment):
        tiny_module(**params)


def _trainable_text(**params):
    """A tiny full fine-tune whose text encoder trains (cond_stage_trainable, freeze: false)."""
    from test_train_ldm import tiny_model_node

    node = tiny_model_node(cond_stage_trainable=True, use_ema=False, **params)
    node["params"]["cond_stage_config"]["params"]["freeze"] = False
    return instantiate_from_config(node, "model")


def test_full_fine_tune_with_a_trainable_text_encoder_trains_the_words_rows_and_the_tower_at_their_rates(
        tmp_path, base_file):  # noqa: F811
    """train_tokens beside a trainable text encoder (kohya's train_text_encoder): the words' rows at token_lr, the
    rest of the tower at text_lr, the UNet at the learning rate; the table's other rows stay."""
    module = _trainable_text(init_from=str(base_file), train_tokens=["circle"], token_lr=0.05, text_lr=2e-3)
    tower = module.conditioner.embedders[0].model
    table = tower.token_embedding.weight
    layer = tower.transformer.resblocks[0].attn.out_proj.weight
    before, layer_before = table.detach().clone(), layer.detach().clone()
    optimizer = module.configure_optimizers()["optimizer"]
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups[1:]] == [0.05, 2e-3] and groups[1]["params"] == [table]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for n, p in tower.named_parameters()
                                                     if n != "token_embedding.weight"}
    assert not {id(p) for p in groups[0]["params"]} & {id(p) for p in tower.parameters()}
    trainer(tmp_path, max_steps=3).fit(module, datamodule=tiny_data())
    changed = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == _bpe_tokenizer().encode("circle")
    assert not torch.equal(layer.detach(), layer_before)


def test_full_fine_tune_preserve_with_a_trainable_text_encoder_distils_the_starting_towers_conditioning(
        base_file):  # noqa: F811
    """preserve's teacher is the starting model whole: once the text encoder has moved, the distilled target is
    still the starting file's prediction on the starting file's conditioning (not on the moved encoder's)."""
    module = _trainable_text(init_from=str(base_file), train_tokens=["star"], preserve=True)
    assert not any("teacher" in k for k in module.state_dict())
    with torch.no_grad():  # the tower (and the UNet) move as training would move them
        for p in [*module.conditioner.parameters(), *module.model.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    base = load_model(None, base_file)
    batch = {"caption": ["a red circle", "two blue squares"]}
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    state = torch.Generator().manual_seed(5).get_state()
    with torch.no_grad():
        got = module._frozen_prediction(batch, state, False, x, t, torch.tensor([True, True]))
        expected = base.apply_model(x, t, base.get_learned_conditioning({"txt": batch["caption"]}))
        moved = module.apply_model(x, t, module.conditioning(batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-3)


def test_preserve_teaches_captions_without_the_words_the_frozen_models_prediction(tmp_path, base_file):  # noqa: F811
    """lora.preserve: samples whose caption names none of the tokens learn the frozen model's prediction. The tiny
    shapes captions never say "star": the LoRA starts equal to the base (up = 0), so the loss is 0 and it stays
    there, while without preserve the same run moves every up matrix."""
    with pytest.raises(ValueError, match="preserve"):
        parse_lora_config({"targets": ["attn"], "preserve": True})
    lora = {"targets": ["attn", "ff", "conv"], "tokens": ["star"]}
    kept = lora_module(base_file, **lora, preserve=True)
    moved = lora_module(base_file, **lora)
    for module, name in ((kept, "kept"), (moved, "moved")):
        module.weight_decay = 0.0
        trainer(tmp_path / name, max_steps=3).fit(module, datamodule=tiny_data())
    ups = lambda m: [p for n, p in m.lora.named_parameters() if n.endswith("lora_up.weight")]  # noqa: E731
    assert all(not p.abs().sum() for p in ups(kept))
    assert all(p.abs().sum() > 0 for p in ups(moved))
    assert kept.lora.names_tokens("Two red STARS and a star.") and not kept.lora.names_tokens("a starfish, stars")


def test_disabled_lora_gives_the_base_model(base_file):  # noqa: F811
    module = lora_module(base_file, tokens=["circle"])
    with torch.no_grad():
        for n, p in module.lora.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    module.eval()
    base = load_model(None, base_file)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    batch = {"caption": ["a red circle"]}
    with torch.no_grad():
        expected = base.apply_model(x, t, base.get_learned_conditioning({"txt": batch["caption"]}))
        with module.lora.disabled():
            got = module.apply_model(x, t, module.conditioning(batch))
        lora_on = module.apply_model(x, t, module.conditioning(batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lora_on, expected, atol=1e-3)


def test_full_fine_tune_preserve_keeps_the_starting_unet_without_the_words(tmp_path, base_file):  # noqa: F811
    from test_train_ldm import tiny_module

    with pytest.raises(ValueError, match="train_tokens"):
        tiny_module(preserve=True)
    kept = tiny_module(init_from=str(base_file), train_tokens=["star"], preserve=True, use_ema=False)
    moved = tiny_module(init_from=str(base_file), train_tokens=["star"], use_ema=False)
    start = {k: v.clone() for k, v in kept.model.state_dict().items()}
    assert "_teacher" not in dict(kept.named_modules()) and not any("teacher" in k for k in kept.state_dict())
    for module, name in ((kept, "kept"), (moved, "moved")):
        trainer(tmp_path / name, max_steps=2).fit(module, datamodule=tiny_data())
    assert all(torch.equal(v, start[k]) for k, v in kept.model.state_dict().items())  # loss 0: nothing moves
    assert not all(torch.equal(v, start[k]) for k, v in moved.model.state_dict().items())


def test_conditioner_records_the_dropped_captions(base_file):  # noqa: F811
    """preserve distils every dropped caption (the unconditional branch stays the base's): the conditioner says
    which samples its dropout replaced."""
    from test_train_ldm import tiny_module

    module = tiny_module(init_from=str(base_file), cond_drop_rate=0.5)
    module.eval()
    captions = [f"{n} red circles" for n in ("one", "two", "three", "four")] * 4
    with torch.no_grad():
        cond = module.conditioning({"caption": captions}, torch.Generator().manual_seed(1), drop=True)["crossattn"]
        dropped = module.conditioner.last_dropped["txt"]
        empty = module.conditioning({"caption": [""]})["crossattn"][0]
    assert module.conditioner.last_dropped == {}  # a call without dropout drops nothing
    assert 0 < int(dropped.sum()) < len(captions)
    assert [bool(torch.allclose(row, empty)) for row in cond] == dropped.tolist()


def test_teacher_targets_and_weight_in_the_diffusion_loss():
    from ldm.diffusion.loss import DiffusionLoss

    loss_fn = DiffusionLoss("v", "uniform", num_timesteps=10)
    alphas = torch.linspace(0.99, 0.1, 10)
    x0, t, noise = torch.randn(4, 2, 3, 3), torch.tensor([1, 3, 5, 7]), torch.randn(4, 2, 3, 3)
    net = lambda x, t, c: x * 0.5  # noqa: E731
    mask = torch.tensor([True, False, True, False])
    plain, _ = loss_fn(net, x0, None, alphas, t=t, noise=noise)
    taught, _ = loss_fn(net, x0, None, alphas, t=t, noise=noise, teacher=lambda x, tt, m: net(x, tt, None),
                        teacher_mask=mask)
    heavy, _ = loss_fn(net, x0, None, alphas, t=t, noise=noise, teacher=lambda x, tt, m: net(x, tt, None),
                       teacher_mask=mask, teacher_weight=10.0)
    # the taught samples' error is 0: only the other two count (a quarter of the batch each), whatever the weight
    per_sample, _ = zip(*[loss_fn(net, x0[i:i + 1], None, alphas, t=t[i:i + 1], noise=noise[i:i + 1])
                          for i in range(4)])
    torch.testing.assert_close(taught, (per_sample[1] + per_sample[3]) / 4)
    torch.testing.assert_close(heavy, taught)
    assert plain > taught
    off = lambda x, tt, m: net(x, tt, None) + 1.0  # noqa: E731  (a teacher the net does not match: error 1 each)
    one, _ = loss_fn(net, x0, None, alphas, t=t, noise=noise, teacher=off, teacher_mask=mask)
    ten, _ = loss_fn(net, x0, None, alphas, t=t, noise=noise, teacher=off, teacher_mask=mask, teacher_weight=10.0)
    torch.testing.assert_close(one - taught, torch.tensor(0.5))  # two of four samples with squared error 1
    torch.testing.assert_close(ten - taught, torch.tensor(5.0))
    with pytest.raises(ValueError, match="weight"):
        parse_lora_config({"tokens": ["x"], "preserve": -1})
    assert parse_lora_config({"tokens": ["x"], "preserve": 5}).preserve == 5.0


def test_preserve_dropped_decides_whether_emptied_captions_are_distilled(tmp_path, base_file):  # noqa: F811
    """Every caption names the trained word and every caption is dropped (cond_drop_rate 1): with preserve_dropped
    (the default) all samples are distilled, the loss is 0 and the LoRA stays at the base; without it they learn
    their pictures and the LoRA moves."""
    lora = {"targets": ["attn", "ff", "conv"], "tokens": ["circle", "circles", "square", "squares", "triangle",
                                                          "triangles"], "preserve": True}
    kept = lora_module(base_file, **lora)
    moved = lora_module(base_file, **lora, preserve_dropped=False)
    for module, name in ((kept, "kept"), (moved, "moved")):
        module.weight_decay = 0.0
        module.conditioner.set_ucg_rate("txt", 1.0)
        trainer(tmp_path / name, max_steps=2).fit(module, datamodule=tiny_data())
    ups = lambda m: [p for n, p in m.lora.named_parameters() if n.endswith("lora_up.weight")]  # noqa: E731
    assert all(not p.abs().sum() for p in ups(kept))
    assert any(p.abs().sum() > 0 for p in ups(moved))
    with pytest.raises(ValueError, match="preserve_dropped"):
        parse_lora_config({"tokens": ["x"], "preserve": True, "preserve_dropped": "no"})


def test_a_preserve_dropped_share_distils_that_share_of_the_dropped_captions(tmp_path, base_file):  # noqa: F811
    """Every caption names the words and is dropped: the distilled (teacher) samples are none at 0, all at 1, some
    of each at 0.5, the same ones in a rerun; the full fine-tune's model.params.preserve_dropped does the same."""
    from test_train_ldm import tiny_module

    words = ["circle", "circles", "square", "squares", "triangle", "triangles"]

    def masks(module, name):
        seen, loss_fn = [], module.loss_fn

        def watched(*args, teacher_mask=None, **kwargs):
            seen.append(teacher_mask.clone())
            return loss_fn(*args, teacher_mask=teacher_mask, **kwargs)

        module.loss_fn = watched
        module.conditioner.set_ucg_rate("txt", 1.0)
        trainer(tmp_path / name, max_steps=4).fit(module, datamodule=tiny_data())
        return torch.cat(seen)

    lora = {"targets": ["attn"], "tokens": words, "preserve": True}
    got = {share: masks(lora_module(base_file, **lora, preserve_dropped=share), f"l{share}")
           for share in (0.0, 0.5, 1.0)}
    assert len(got[0.5]) == 16 and not got[0.0].any() and got[1.0].all()
    assert 0 < got[0.5].sum() < 16
    assert torch.equal(masks(lora_module(base_file, **lora, preserve_dropped=0.5), "again"), got[0.5])
    full = masks(tiny_module(init_from=str(base_file), train_tokens=words, preserve=True, preserve_dropped=0.5,
                             use_ema=False), "full")
    assert 0 < full.sum() < 16
    assert parse_lora_config({"tokens": ["x"], "preserve": True, "preserve_dropped": 0.25}).preserve_dropped == 0.25
    with pytest.raises(ValueError, match=r"lora.preserve_dropped=1.5 must be true, false or a share in \[0, 1\]"):
        parse_lora_config({"tokens": ["x"], "preserve": True, "preserve_dropped": 1.5})
    with pytest.raises(ValueError, match="preserve_dropped is a part of model.params.preserve"):
        tiny_module(init_from=str(base_file), train_tokens=words, preserve_dropped=False)
