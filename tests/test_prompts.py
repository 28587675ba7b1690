"""A1111 prompt syntax (ldm.adapters.prompts): parsing, chunking at 75 tokens and commas, BREAK, weighting with the
mean restored, prompt objects through every text encoder, and plain prompts encoded bit for bit as before."""
from __future__ import annotations

import pytest
import torch

from ldm.adapters.prompts import BREAK, WeightedPrompt, chunk_prompt, parse_prompt_attention, prompt_inputs
from ldm.models.conditioner import TextEmbedder
from ldm.models.text_encoder import OpenCLIPTextEncoder, PromptTokens, _bpe_tokenizer, emphasize
from tiny_models import tiny_ckpt, tiny_model  # noqa: F401  (fixture)

SOT, EOT, COMMA = 49406, 49407, 267
R, S = 1.1, 1 / 1.1


def ids(text: str) -> list[int]:
    return _bpe_tokenizer().encode(text)


def words(n: int, start: int = 0) -> str:
    """n distinct one-token words."""
    vocab = ["cat", "dog", "red", "blue", "tree", "house", "sun", "moon", "star", "car", "boat", "fish", "bird",
             "rock", "lake", "hill", "road", "door", "cup", "hat"]
    out = [f"{vocab[i % len(vocab)]}" for i in range(start, start + n)]
    assert all(len(ids(w)) == 1 for w in out)
    return " ".join(out)


# ---- parsing (hand-worked; the first block is A1111's own doctest) ------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.5 * R),
      (", sun, ", R), ("sky", R ** 4), (".", R)]),
    ("(a:1.5) [b] ((c))", [("a", 1.5), (" ", 1.0), ("b", S), (" ", 1.0), ("c", R * R)]),
    ("((word))", [("word", R * R)]),
    ("[[word]]", [("word", S * S)]),
    ("([word])", [("word", 1.0)]),  # 1.1 / 1.1
    ("(word: 1.3 )", [("word", 1.3)]),  # spaces around the weight
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("unbalanced) and ] close", [("unbalanced) and ] close", 1.0)]),  # stray closers are text
    ("[unclosed (both", [("unclosed ", S), ("both", S * R)]),
    ("a:b (c:d) e", [("a:b ", 1.0), ("c:d", R), (" e", 1.0)]),  # a colon without a number is text
    ("\\\\ and \\ x", [("\\ and  x", 1.0)]),  # \\ is a backslash, a lone \ is dropped
    ("\\((escaped first)", [("(", 1.0), ("escaped first", R)]),
    ("<lora:name:0.8> a cat", [("<lora:name:0.8> a cat", 1.0)]),  # <...> is ordinary text
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("BREAKfast, break", [("BREAKfast, break", 1.0)]),  # only the capital word on its own
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
])
def test_parse(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_a_weight_that_is_no_number_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"prompt weight '1\.2\.3'.*\(word:1\.2\)"):
        parse_prompt_attention("(word:1.2.3)")


# ---- chunking --------------------------------------------------------------------------------------------------------

def test_short_prompt_is_one_chunk_with_weights_per_token():
    (chunk,) = chunk_prompt("a (red:1.5) circle")
    assert chunk.ids == ids("a") + ids("red") + ids("circle")
    assert chunk.weights == [1.0, 1.5, 1.0] and chunk.fixes == []
    (empty,) = chunk_prompt("")
    assert empty.ids == [] and empty.weights == []


@pytest.mark.parametrize("n, sizes", [(75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])])
def test_chunk_boundaries_without_commas(n, sizes):
    chunks = chunk_prompt(words(n))
    assert [len(c.ids) for c in chunks] == sizes
    assert [t for c in chunks for t in c.ids] == ids(words(n))


def test_a_full_chunk_moves_the_text_after_its_last_comma_to_the_next():
    # comma at index 60 of the chunk: within 20 tokens of its end, so tokens 61.. move on
    text = words(60) + ", " + words(20, start=60)  # 81 tokens
    first, second = chunk_prompt(text)
    assert len(first.ids) == 61 and first.ids[-1] == COMMA
    assert second.ids == ids(words(20, start=60))
    # a comma 21 tokens before the end is too far back: a hard cut at 75
    text = words(53) + ", " + words(30, start=53)  # comma at index 53, 75 - 53 = 22 > 20
    first, second = chunk_prompt(text)
    assert len(first.ids) == 75 and len(second.ids) == 84 - 75
    # exactly 20 back moves
    first, _ = chunk_prompt(words(55) + ", " + words(30, start=55))  # comma at 55, 75 - 55 = 20
    assert len(first.ids) == 56
    # comma_backtrack=0 switches it off
    first, _ = chunk_prompt(words(60) + ", " + words(20, start=60), comma_backtrack=0)
    assert len(first.ids) == 75


def test_weights_move_with_their_tokens():
    text = words(60) + ", (" + words(20, start=60) + ":1.4)"
    first, second = chunk_prompt(text)
    assert first.weights == [1.0] * 61 and second.weights == pytest.approx([1.4] * 20)


def test_break_starts_a_new_chunk():
    chunks = chunk_prompt("a red circle BREAK a blue square")
    assert [c.ids for c in chunks] == [ids("a red circle"), ids("a blue square")]
    assert [len(c.ids) for c in chunk_prompt("a BREAK BREAK b")] == [1, 0, 1]  # an empty chunk between
    assert [len(c.ids) for c in chunk_prompt("a BREAK")] == [1]  # nothing after the last BREAK: no chunk
    assert [len(c.ids) for c in chunk_prompt("BREAK a")] == [0, 1]


def test_window_length_follows_the_encoder():
    assert [len(c.ids) for c in chunk_prompt(words(25), chunk_length=10)] == [10, 10, 5]


# ---- encoding --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder("ldm-tiny-text", layer="last", pad="zero", projection=False)
    torch.nn.init.normal_(enc.model.ln_final.bias, 0.5, 0.2)  # a trained CLIP's outputs have a mean far from 0
    return enc


def test_prompt_tokens_are_wrapped_and_padded_to_the_batch(encoder):
    tokens, weights, embeddings = encoder.tokenize_prompts([WeightedPrompt("a (red) circle"),
                                                            WeightedPrompt(words(80))])
    assert tokens.shape == (2, 154) and weights.shape == (2, 154) and embeddings is None
    assert tokens[0, :5].tolist() == [SOT, *ids("a red circle"), EOT]
    assert tokens[0, 5:77].eq(0).all()  # SD2-style padding with 0
    assert tokens[0, 77:80].tolist() == [SOT, EOT, 0]  # the short prompt's empty second chunk
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.1, 1.0, 1.0]) and weights[0, 5:].eq(1).all()
    assert tokens[1, 77:84].tolist() == [SOT, *ids(words(80))[75:], EOT]


def test_weighting_multiplies_then_restores_the_mean(encoder):
    plain = encoder.encode(["a red circle"])[0]
    weighted = encoder.encode([WeightedPrompt("a (red:1.5) circle")])[0]
    w = torch.ones(77)
    w[2] = 1.5
    scaled = plain * w[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    ratio = (weighted / plain)
    torch.testing.assert_close(ratio[2] / ratio[1], torch.full_like(ratio[2], 1.5))  # 1.5 relative to the rest


def test_emphasize_restores_each_windows_mean():
    z = torch.randn(3, 5, 4) + 1
    w = torch.rand(3, 5) + 0.5
    out = emphasize(z, w)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))
    torch.testing.assert_close(out / z, (w * (z.mean(dim=(1, 2)) / (z * w[..., None]).mean(dim=(1, 2)))[:, None]
                                         )[..., None].expand_as(z))


def test_long_prompts_are_chunks_encoded_alone(encoder):
    text = words(60) + ", " + words(20, start=60)
    out = encoder.encode([WeightedPrompt(text)])
    assert out.shape == (1, 154, 32)
    torch.testing.assert_close(out[:, :77], encoder.encode([words(60) + ","]))
    torch.testing.assert_close(out[:, 77:], encoder.encode([words(20, start=60)]))
    broken = encoder.encode([WeightedPrompt("a red circle BREAK a blue square")])
    torch.testing.assert_close(broken, torch.cat([encoder.encode(["a red circle"]),
                                                  encoder.encode(["a blue square"])], dim=1))


@pytest.mark.parametrize("prompts", [["a red circle", "two blue squares"], [""], [words(75)],
                                     ["a photo: of <x> cats!"]])
def test_plain_prompts_give_bit_identical_conditioning(prompts):
    """No special syntax and at most 75 tokens: the same tensor as the string path, to the bit."""
    model = tiny_model()
    plain = model.get_learned_conditioning(prompts)
    a1111 = model.get_learned_conditioning(prompt_inputs(prompts, "a1111"))
    assert torch.equal(plain, a1111)
    assert prompt_inputs(prompts, "plain") == prompts


def test_strings_mixed_with_prompt_objects_use_the_encoders_own_tokenization(encoder):
    mixed = encoder.encode(["a red circle", WeightedPrompt("a (blue) square")])
    torch.testing.assert_close(mixed[:1], encoder.encode(["a red circle"]))
    with pytest.raises(ValueError, match="windows"):
        encoder.tokenize_prompts([_Raw(PromptTokens([list(range(76))], [[1.0] * 76]))])


class _Raw:
    def __init__(self, tokens):
        self.tokens = tokens

    def prompt_tokens(self, encoder):
        return self.tokens


def test_pooled_text_embedder_pools_the_first_window_unweighted():
    torch.manual_seed(0)
    embedder = TextEmbedder("ldm-tiny-text", layer="penultimate", projection=True, pooled=True)
    context, pooled = embedder(["a red circle"])
    same_context, same_pooled = embedder([WeightedPrompt("a red circle")])
    assert torch.equal(context, same_context) and torch.equal(pooled, same_pooled)
    long_context, long_pooled = embedder([WeightedPrompt("a (red:1.4) circle BREAK a square")])
    assert long_context.shape == (1, 154, 32)
    _, first_pooled = embedder([WeightedPrompt("a red circle")])
    # pooled from the first chunk; the weight changes the context only
    torch.testing.assert_close(long_pooled, first_pooled)
    assert not torch.allclose(long_context[:, :77], context)


# ---- pipeline -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    from ldm.pipeline import Text2Image
    return Text2Image.from_checkpoint(tiny_ckpt, device="cpu")


FAST = dict(steps=2, height=32, width=32, seeds=3)


def _same_images(a, b) -> bool:
    import numpy as np
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def test_pipeline_plain_prompts_give_the_same_image_in_both_syntaxes(pipe):
    assert pipe.prompt_syntax == "a1111"
    a1111 = pipe(["a red circle", "two blue squares"], negative_prompts="blurry", **FAST)
    weighted = pipe(["a (red:1.6) circle", "two blue squares"], negative_prompts="blurry", **FAST)
    pipe.prompt_syntax = "plain"
    try:
        plain = pipe(["a red circle", "two blue squares"], negative_prompts="blurry", **FAST)
        plain_cond = pipe.encode_prompts("a (red:1.6) circle")["crossattn"]
    finally:
        pipe.prompt_syntax = "a1111"
    assert _same_images(a1111, plain)
    assert not _same_images(weighted, a1111)
    assert not torch.equal(plain_cond, pipe.encode_prompts("a (red:1.6) circle")["crossattn"])


def test_encode_prompts_applies_weights_and_chunks(pipe):
    cond = pipe.encode_prompts(["a (red:1.3) circle", words(80)])["crossattn"]
    assert cond.shape == (2, 154, 32)
    encoder = pipe.model.cond_stage_model
    expected = encoder.encode([WeightedPrompt("a (red:1.3) circle"), WeightedPrompt(words(80))])
    torch.testing.assert_close(cond, expected)


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_prompt_and_negative_are_padded_to_the_same_chunks(pipe, long_side):
    long, short = words(100), "blurry"
    prompt, negative = (long, short) if long_side == "prompt" else (short, long)
    seen = []
    from ldm.diffusion import guidance
    original = guidance.concat_cond

    def spy(uncond, cond, batch):
        if isinstance(cond, dict):
            seen.append((uncond["crossattn"].clone(), cond["crossattn"].clone()))
        return original(uncond, cond, batch)

    guidance.concat_cond = spy
    try:
        out = pipe(prompt, negative_prompts=negative, guidance_scale=5.0, **FAST)
    finally:
        guidance.concat_cond = original
    assert len(out.images) == 1 and seen
    uncond, cond = seen[0]
    assert uncond.shape == cond.shape == (1, 154, 32)
    padded = uncond if long_side == "prompt" else cond
    empty = pipe.encode_prompts("")["crossattn"]
    torch.testing.assert_close(padded[:, 77:], empty)  # an empty chunk, as A1111's pad_cond_uncond adds
    torch.testing.assert_close(padded[:, :77], pipe.encode_prompts(short)["crossattn"])
