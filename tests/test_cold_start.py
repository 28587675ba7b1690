"""Cold start of sample.py: what its import pulls in, and the open_clip pieces the text encoder carries itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from ldm.models import clip_text
from ldm.models.text_encoder import OpenCLIPTextEncoder, register_text_archs

REPO = Path(__file__).resolve().parents[1]
# never needed to sample: training (Lightning and its loggers, metrics), the diffusers/transformers ports, the HTTP
# server, open_clip's model zoo (and the torchvision / torch._dynamo it imports)
HEAVY = ("lightning", "pytorch_lightning", "tensorboard", "torch.utils.tensorboard", "torchmetrics", "diffusers",
         "transformers", "open_clip", "torchvision", "torch._dynamo", "fastapi", "scipy", "webdataset")


def _imported_by(code: str) -> set[str]:
    """The top-level module names in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_sample_cli_and_pipeline_import_nothing_heavy():
    loaded = _imported_by("import ldm.cli.sample, ldm.pipeline, ldm.convert, ldm.adapters.lora")
    assert not sorted(name for name in HEAVY if name in loaded)


def test_sample_run_imports_nothing_heavy(tmp_path):
    """A whole (1-step) run of the demo model: the lazy imports inside it stay light too."""
    code = ("import ldm.cli.sample as s\n"
            f"assert s.main(['--steps', '1', '--n_samples', '1', '--outdir', {str(tmp_path)!r}]) == 0")
    loaded = _imported_by(code)
    assert not sorted(name for name in HEAVY if name in loaded)
    assert "ftfy" not in loaded  # a plain ASCII prompt needs no text fixing (BPETokenizer.clean)
    assert "regex" not in loaded  # nor the Unicode pre-tokenizer (BPETokenizer.words)
    assert "ldm.adapters.lora" not in loaded  # no --lora, no <lora:...> tag
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_tokenizer_cleans_as_with_ftfy_and_skips_it_only_where_it_changes_nothing():
    """BPETokenizer.clean skips ftfy for printable ASCII without "&": the same text as ftfy gives, on random ASCII
    (with the characters ftfy does change: "&", control characters, "\\r") and on text it must fix."""
    import html
    import random
    import string

    import ftfy

    from ldm.models.clip_text import BPETokenizer

    def reference(text):  # open_clip's basic_clean + whitespace_clean + lower
        return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()

    clean = BPETokenizer.clean.__get__(object.__new__(BPETokenizer))
    rng = random.Random(0)
    alphabet = string.printable + "&\x00\x1b\x7f"
    plain = string.ascii_letters + string.digits + string.punctuation.replace("&", "") + " \t\n"
    texts = ["".join(rng.choice(alphabet if i % 2 else plain) for _ in range(rng.randint(0, 40)))
             for i in range(4000)]
    texts += ["a cat &amp;amp; a dog", "caf\u00c3\u00a9 au lait", "\u201ccurly\u201d quotes", "line\r\nbreak",
              "ﬁne ligature", "two red circles above a blue square"]
    assert [clean(t) for t in texts] == [reference(t) for t in texts]
    assert clean("caf\u00c3\u00a9") == "caf\u00e9"  # mojibake still fixed: non-ASCII goes through ftfy


@pytest.mark.parametrize("arch, kwargs", [("ldm-tiny-text", {}), ("ldm-tiny-text", dict(ls_init_value=0.1)),
                                          ("ViT-B-32", dict(proj_bias=True))])
def test_text_tower_is_open_clips_for_a_seed(arch, kwargs):
    """Same submodules in the same order: same state dict names, shapes and random initialisation for a seed."""
    register_text_archs()
    cfg = open_clip.get_model_config(arch)["text_cfg"]
    if arch == "ViT-B-32":  # a full-size config, kept small here
        cfg = {**cfg, "layers": 2}
    args = dict(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"], width=cfg["width"],
                heads=cfg["heads"], layers=cfg["layers"], output_dim=16, **kwargs)
    torch.manual_seed(0)
    theirs = open_clip.transformer.TextTransformer(**args, act_layer=open_clip.transformer.QuickGELU)
    torch.manual_seed(0)
    ours = clip_text.TextTransformer(**args, act_layer=clip_text.QuickGELU)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(theirs.attn_mask, ours.attn_mask, rtol=0, atol=0)
    x = torch.randn(2, 7, cfg["width"])
    mask = ours.attn_mask[:7, :7]
    for block_a, block_b in zip(theirs.transformer.resblocks, ours.transformer.resblocks):
        torch.testing.assert_close(block_a(x, attn_mask=mask), block_b(x, attn_mask=mask))


def test_arch_configs_are_open_clips():
    register_text_archs()
    for arch in ("ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ldm-tiny-text", "ldm-small-text"):
        assert clip_text.arch_config(arch) == open_clip.get_model_config(arch)
    assert set(open_clip.list_models()) <= set(clip_text.arch_names())
    assert clip_text.arch_config("no-such-arch") is None
    with pytest.raises(ValueError, match="unknown text encoder arch"):
        OpenCLIPTextEncoder("no-such-arch")


def test_tokenizer_is_open_clips():
    theirs = open_clip.tokenizer.SimpleTokenizer()
    ours = clip_text.BPETokenizer()
    texts = ["two red circles above a blue square", "", "  A   PHOTO of  a Cat!!  ", "don't we'll I'm", "3.14 x 42",
             "caf\u00e9 na\u00efve \u00fcber", "&amp;lt;b&amp;gt; tags &quot;quoted&quot;", "emoji \U0001F600 \u2764\ufe0f",
             "\u65e5\u672c\u8a9e\u306e\u6587", "mojibake: \u00c3\u00a9t\u00c3\u00a9", "a,b;c:d (e) [f] {g} <h>",
             "supercalifragilisticexpialidocious antidisestablishmentarianism", "<start_of_text>x<end_of_text>"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (theirs.sot_token_id, theirs.eot_token_id,
                                                                       theirs.vocab_size)
    assert ours.encoder == theirs.encoder
    assert ours.bpe_ranks == {f"{a} {b}": rank for (a, b), rank in theirs.bpe_ranks.items()}


def test_tokenizer_ascii_words_are_open_clips():
    """ASCII prompts are split by ``re`` (no ``regex`` import): the same ids as open_clip's tokenizer on random ASCII
    text of every printable character and word-like runs, and ``regex`` stays unimported for them."""
    import random
    import string

    theirs = open_clip.tokenizer.SimpleTokenizer()
    ours = clip_text.BPETokenizer()
    rng = random.Random(0)
    words = ["red", "circles", "don't", "it's", "we'll", "I'M", "x2", "3rd", "10", "a-b", "<end_of_text>", "..."]
    texts = ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30))) for _ in range(1500)]
    texts += [" ".join(rng.choice(words + list(string.punctuation)) for _ in range(rng.randint(1, 8)))
              for _ in range(500)]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), repr(text)
    assert "pat" not in vars(ours)  # the regex pattern was never built: every text above is ASCII
    assert ours.encode("caf\u00e9 \u00fcber") == theirs.encode("caf\u00e9 \u00fcber") and "pat" in vars(ours)


# --- model loading: no random initialisation where a strict load overwrites it -------------------------------

def _count_calls(monkeypatch, name: str) -> list:
    calls = []
    original = getattr(torch.nn.init, name)

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, name, counting)
    return calls


def test_strict_load_draws_no_random_weights_and_loads_them_all(monkeypatch, tmp_path):
    from ldm.convert import load_model
    from ldm.io import read_state_dict
    from tiny_models import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "tiny.safetensors")
    kaiming_calls, normal_calls = _count_calls(monkeypatch, "kaiming_uniform_"), _count_calls(monkeypatch, "normal_")
    kaiming = torch.nn.init.kaiming_uniform_
    model = load_model(None, path)
    assert kaiming_calls == normal_calls == []  # nothing drawn ...
    assert torch.nn.init.kaiming_uniform_ is kaiming  # ... and the initialisers are back
    saved = read_state_dict(path)[0]
    state = model.state_dict()
    assert set(saved) == set(state)
    for name, value in saved.items():  # ... and every weight is the file's
        assert torch.equal(state[name], value), name

    load_model(None, path, strict=False)  # a non-strict load may leave some as built: they are drawn
    assert kaiming_calls and normal_calls


def test_a_failed_load_restores_the_initialisers(tmp_path):
    from ldm.convert import load_model
    from ldm.io import CheckpointError, read_state_dict, save_checkpoint
    from tiny_models import tiny_checkpoint, tiny_config

    state = read_state_dict(tiny_checkpoint(tmp_path / "tiny.safetensors"))[0]
    state.pop(next(iter(state)))
    path = save_checkpoint(state, tmp_path / "partial.safetensors", config=tiny_config())
    normal = torch.nn.init.normal_
    with pytest.raises(CheckpointError):
        load_model(None, path)
    assert torch.nn.init.normal_ is normal


def test_exiting_freezes_the_collector_and_keeps_the_status():
    code = ("import gc, sys\nfrom ldm.cli.common import exiting\nbefore = gc.get_freeze_count()\n"
            "status = exiting(3)\nprint(before, gc.get_freeze_count() > 1000)\nsys.exit(status)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 3 and out.stdout.split() == ["0", "True"]


def test_exit_now_runs_the_atexit_handlers_flushes_and_keeps_the_status(tmp_path):
    """sample.py's end: the atexit handlers run and buffered output arrives (a pipe: block-buffered), the status is
    the process's, and a logging file handler is flushed; the teardown (here a global's __del__) does not run."""
    log = tmp_path / "run.log"
    code = ("import atexit, logging, sys\nfrom ldm.cli.common import exit_now\n"
            f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\nlogging.info('logged')\n"
            "atexit.register(lambda: print('handler ran'))\nsys.stdout.write('buffered ')\n"
            "sys.stderr.write('err')\nclass Kept:\n    def __del__(self): print('torn down')\nkept = Kept()\n"
            "exit_now(4)\nprint('never')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (out.returncode, out.stdout, out.stderr) == (4, "buffered handler ran\n", "err")
    assert "logged" in log.read_text()
    for script in (REPO / "sample.py", REPO / "ldm" / "sample.py"):  # both __main__ paths end this way
        assert "exit_now(" in script.read_text()


def test_load_clip_knows_the_projects_archs_without_a_text_encoder_built(tmp_path):
    """Building a text encoder registered the project's archs with open_clip as a side effect; it no longer imports
    open_clip, so load_clip registers them itself (a fresh process: nothing registered before)."""
    register_text_archs()
    path = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("ldm-tiny-text", pretrained=None).state_dict(), path)
    code = f"from ldm.metrics import load_clip\nprint(type(load_clip('ldm-tiny-text', {str(path)!r})).__name__)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "CLIP"
