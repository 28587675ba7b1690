"""Textual inversion (ldm.adapters.embeddings): file formats, trigger words, vectors at their token positions,
chunk boundaries, width checks, and the pipeline's "TI hashes"."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.embeddings import EmbeddingLibrary, read_embedding
from ldm.adapters.prompts import WeightedPrompt, chunk_prompt, text_encoders
from ldm.io import CheckpointError
from ldm.models.text_encoder import OpenCLIPTextEncoder, _bpe_tokenizer
from ldm.pipeline import Text2Image
from tiny_models import tiny_ckpt  # noqa: F401  (fixture)

WIDTH = 32  # ldm-tiny-text


def ids(text: str) -> list[int]:
    return _bpe_tokenizer().encode(text)


def a1111_pt(path, vectors: torch.Tensor):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "ignored",
                "step": 1000, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "model"}, path)
    return path


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return OpenCLIPTextEncoder("ldm-tiny-text", layer="last", pad="zero", projection=False)


# ---- formats ------------------------------------------------------------------------------------------------------

def test_every_format_reads_with_its_trigger_word(tmp_path):
    v2, v3 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    pt = read_embedding(a1111_pt(tmp_path / "my-style.pt", v2))
    assert pt.name == "my-style" and pt.num_vectors == 2 and torch.equal(pt.vectors[""], v2)
    assert pt.hash == hashlib.sha256((tmp_path / "my-style.pt").read_bytes()).hexdigest()[:12]
    save_file({"emb_params": v3}, tmp_path / "badhands.safetensors")
    st = read_embedding(tmp_path / "badhands.safetensors")
    assert st.name == "badhands" and torch.equal(st.vectors[""], v3)
    save_file({"clip_l": torch.randn(2, 16), "clip_g": torch.randn(2, WIDTH)}, tmp_path / "xl.safetensors")
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert set(xl.vectors) == {"clip_l", "clip_g"} and xl.widths == [16, WIDTH] and xl.num_vectors == 2
    one = torch.randn(WIDTH)
    torch.save({"<cat-toy>": one}, tmp_path / "learned_embeds.bin")
    diffusers = read_embedding(tmp_path / "learned_embeds.bin")
    assert diffusers.name == "<cat-toy>" and torch.equal(diffusers.vectors[""], one[None])
    save_file({"<cat-toy>": v2}, tmp_path / "cat.safetensors")
    assert read_embedding(tmp_path / "cat.safetensors").name == "cat"  # a renamed file: its stem
    assert read_embedding(tmp_path / "cat.safetensors", token="kitty").name == "kitty"


def test_bad_files_are_one_line_errors(tmp_path, encoder):
    save_file({"a": torch.randn(2, WIDTH), "b": torch.randn(2, WIDTH)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="two.safetensors is not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")
    # the original textual_inversion repo pickled an nn.ParameterDict: a module, refused by weights_only
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, WIDTH))})},
               tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_embedding(tmp_path / "module.pt")
    with pytest.raises(FileNotFoundError, match="embedding not found"):
        read_embedding(tmp_path / "missing.pt")
    save_file({"emb_params": torch.randn(2, 48)}, tmp_path / "other-model.safetensors")
    with pytest.raises(ValueError) as e:
        EmbeddingLibrary().load(tmp_path / "other-model.safetensors", encoders=[encoder])
    message = str(e.value)
    assert "other-model.safetensors" in message and "48" in message and "32" in message
    assert len(message.splitlines()) == 1


def test_a_folder_loads_what_fits_and_skips_the_rest(tmp_path, encoder, caplog):
    caplog.set_level("INFO", logger="ldm.adapters.embeddings")
    a1111_pt(tmp_path / "fits.pt", torch.randn(1, WIDTH))
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": torch.randn(1, WIDTH)}, tmp_path / "sub" / "also.safetensors")
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "sd1.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    library = EmbeddingLibrary()
    loaded = library.load_dir(tmp_path, encoders=[encoder])
    assert sorted(e.name for e in loaded) == ["also", "fits"] and "sd1" not in library
    assert "skipped embedding" in caplog.text and "sd1.safetensors" in caplog.text


# ---- in the prompt -------------------------------------------------------------------------------------------------

def library_with(tmp_path, name="my-style", n=2):
    vectors = torch.randn(n, WIDTH)
    library = EmbeddingLibrary()
    library.load(a1111_pt(tmp_path / f"{name}.pt", vectors))
    return library, vectors


def test_vectors_appear_at_the_token_positions(tmp_path, encoder):
    library, vectors = library_with(tmp_path)
    tokens, weights, embeddings = encoder.tokenize_prompts([WeightedPrompt("a my-style cat", library)])
    assert tokens[0, :6].tolist() == [49406, *ids("a"), 0, 0, *ids("cat"), 49407]
    assert torch.equal(embeddings[0, 2:4], vectors)
    others = torch.ones(77, dtype=torch.bool)
    others[2:4] = False
    assert torch.equal(embeddings[0, others], encoder.model.token_embedding(tokens[0])[others])
    assert weights is None
    # the encoder runs on those input embeddings
    out = encoder.encode([WeightedPrompt("a my-style cat", library)])
    manual = encoder._encode_windows(tokens, embeddings)
    assert torch.equal(out, manual)
    assert not torch.allclose(out, encoder.encode([WeightedPrompt("a my-style cat")]))


def test_weights_and_chunks_treat_an_embedding_as_its_vectors(tmp_path):
    library, _ = library_with(tmp_path, n=3)
    (chunk,) = chunk_prompt("a (my-style:1.5) cat", embeddings=library)
    assert chunk.ids == [*ids("a"), 0, 0, 0, *ids("cat")]
    assert chunk.weights == [1.0, 1.5, 1.5, 1.5, 1.0]
    assert [(p, e.name) for p, e in chunk.fixes] == [(1, "my-style")]
    # 73 words: the 3 vectors do not fit in the 2 positions left, so they start the next chunk
    words = " ".join(["cat"] * 73)
    first, second = chunk_prompt(words + " my-style", embeddings=library)
    assert len(first.ids) == 73 and first.fixes == []
    assert second.ids == [0, 0, 0] and [p for p, _ in second.fixes] == [0]
    # a comma backtrack carries the embedding along, at its new position
    words = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 10)
    first, second = chunk_prompt(words + " my-style " + " ".join(["dog"] * 10), embeddings=library)
    assert len(first.ids) == 61 and first.fixes == []
    assert [p for p, _ in second.fixes] == [10] and second.ids[10:13] == [0, 0, 0]


def test_longest_name_wins_and_names_match_case_insensitively(tmp_path):
    library = EmbeddingLibrary()
    library.load(a1111_pt(tmp_path / "style.pt", torch.randn(1, WIDTH)))
    library.load(a1111_pt(tmp_path / "style-two.pt", torch.randn(4, WIDTH)))
    (chunk,) = chunk_prompt("Style-Two and style", embeddings=library)
    assert [(p, e.name) for p, e in chunk.fixes] == [(0, "style-two"), (5, "style")]  # 4 vectors, "and"
    assert WeightedPrompt("a style-two, style", library).used_embeddings() == [library["style-two"],
                                                                                library["style"]]


def test_sdxl_style_file_gives_each_encoder_its_set(tmp_path):
    torch.manual_seed(0)
    small = OpenCLIPTextEncoder("ldm-tiny-text", layer="last", projection=False)
    large = OpenCLIPTextEncoder("ldm-small-text", layer="last", projection=False)
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 128)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl-style.safetensors")
    library = EmbeddingLibrary()
    library.load(tmp_path / "xl-style.safetensors", encoders=[small, large])
    prompt = WeightedPrompt("a xl-style", library)
    assert torch.equal(small.tokenize_prompts([prompt])[2][0, 2:4], clip_l)
    assert torch.equal(large.tokenize_prompts([prompt])[2][0, 2:4], clip_g)
    large.embedding_key = "clip_l"  # an encoder may name its set; then the widths must agree
    with pytest.raises(ValueError):
        large.tokenize_prompts([prompt])


# ---- pipeline --------------------------------------------------------------------------------------------------------

def test_pipeline_uses_embeddings_and_records_ti_hashes(tiny_ckpt, tmp_path):
    pipe = Text2Image.from_checkpoint(tiny_ckpt, device="cpu")
    path = a1111_pt(tmp_path / "shiny.pt", torch.randn(2, WIDTH) * 3)
    embedding = pipe.load_embedding(path)
    assert embedding.name == "shiny" and text_encoders(pipe.model)
    fast = dict(steps=2, height=32, width=32, seeds=1)
    with_it = pipe("a shiny circle", negative_prompts="blurry", **fast)
    without = pipe("a circle", negative_prompts="blurry", **fast)
    assert with_it.parameters[0]["ti_hashes"] == f"shiny: {embedding.hash}"
    assert "ti_hashes" not in without.parameters[0]
    in_negative = pipe("a circle", negative_prompts="shiny", **fast)
    assert in_negative.parameters[0]["ti_hashes"] == f"shiny: {embedding.hash}"
    cond = pipe.encode_prompts("a shiny circle")["crossattn"]
    assert not torch.allclose(cond, pipe.encode_prompts("a circle")["crossattn"][:, :77])
