import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.accel import attention as accel_attn
from ldm.accel import onednn
from ldm.models import attention as attn_mod
from ldm.models.attention import (BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer, attention,
                                  maybe_checkpoint, set_attention_backend)


def _qkv(b=2, h=3, nq=10, nk=7, d=8, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, nk, d, dtype=dtype),
            torch.randn(b, h, nk, d, dtype=dtype))


def _reference(q, k, v, mask=None):
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v.double()).to(q.dtype)


def _randomize(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)


@pytest.mark.parametrize("backend", ["sdpa", "math", "blocked", "auto"])
@pytest.mark.parametrize("slice_size", [None, 1, 3, 100])
def test_backends_match_reference(backend, slice_size):
    """The model's attention function and ldm.accel's (which adds "blocked" and the CPU "auto")."""
    q, k, v = _qkv()
    for fn in (accel_attn.attention,) if backend == "blocked" else (attention, accel_attn.attention):
        out = fn(q, k, v, backend=backend, slice_size=slice_size)
        assert out.shape == q.shape
        torch.testing.assert_close(out, _reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slice_size", [None, 4])
def test_bool_mask_sdpa_and_math_agree(slice_size):
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 10, 7) > 0.3
    mask[..., 0] = True  # every query row keeps a key
    expected = _reference(q, k, v, mask)
    for backend in ("sdpa", "math", "blocked"):
        out = accel_attn.attention(q, k, v, backend=backend, slice_size=slice_size, mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_math_upcasts_and_casts_back():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = attention(q, k, v, backend="math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q.float(), k.float(), v.float()), atol=2e-2, rtol=2e-2)
    # under autocast the scores and softmax stay fp32 (as the reference); only weights @ v runs in bf16
    q, k, v = _qkv(nq=64, nk=64, d=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="math")
    weights = (q @ k.transpose(-1, -2) * 32 ** -0.5).softmax(-1)
    assert torch.equal(out, weights.bfloat16() @ v.bfloat16())
    bf16_scores = (q.bfloat16() @ k.bfloat16().transpose(-1, -2) * 32 ** -0.5).softmax(-1)
    assert not torch.equal(out, bf16_scores @ v.bfloat16())


def test_bad_backend_and_slice_size_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="slice_size"):
        attention(q, k, v, slice_size=0)
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, dim_head\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unknown attention backend"):
        CrossAttention(32, backend="fast")


def test_xformers_on_cpu_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="xformers"):
        attention(q, k, v, backend="xformers")


@pytest.fixture(autouse=True)
def python_kernels(monkeypatch):
    """These tests are about the Python kernels and the choice among them: the compiled fused kernel is off
    (tests/test_cpu_kernels.py has it, and the choice with it)."""
    monkeypatch.setattr(accel_attn, "USE_CPU_KERNELS", False)


def _record_kernels(monkeypatch) -> list:
    calls = []
    for name in ("sdpa", "math"):
        monkeypatch.setitem(attn_mod.KERNELS, name, lambda *a, n=name, f=attn_mod.KERNELS[name]: calls.append(n)
                            or f(*a))
    monkeypatch.setattr(accel_attn, "_blocked", lambda *a, f=accel_attn._blocked: calls.append("blocked") or f(*a))
    return calls


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_auto_picks_by_dtype_size_and_autograd_on_cpu(monkeypatch, one_thread):
    calls = _record_kernels(monkeypatch)
    auto = functools.partial(accel_attn.attention, backend="auto")
    q, k, v = _qkv()
    auto(q, k, v)
    assert calls == ["sdpa"]  # fp32
    long = _qkv(nq=8, nk=accel_attn.BLOCKED_MIN_KEYS, d=16, dtype=torch.bfloat16)
    text = _qkv(nq=8, nk=77, d=16, dtype=torch.bfloat16)
    many = _qkv(nq=accel_attn.BLOCKED_MIN_SCORES // 77 + 1, nk=77, d=8, dtype=torch.bfloat16)
    big = _qkv(nq=accel_attn.MATH_MAX_SCORES // 256 + 1, nk=256, d=8, dtype=torch.bfloat16)
    with torch.no_grad():
        auto(*long)  # bf16 inference over a feature map: blocked
        auto(*text)  # a text context: math
        auto(*many)  # a text context at many pixels: blocked
    auto(*long)  # autograd on, small: math
    auto(*big)   # autograd on, large: sdpa
    assert calls == ["sdpa", "blocked", "math", "blocked", "math", "sdpa"]


def test_auto_takes_the_flash_kernel_over_blocked_with_several_threads(monkeypatch):
    calls = _record_kernels(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            accel_attn.attention(*_qkv(nq=8, nk=accel_attn.BLOCKED_MIN_KEYS, d=16, dtype=torch.bfloat16),
                                 backend="auto")  # a feature map: one parallel region per call
            accel_attn.attention(*_qkv(nq=8, nk=77, d=16, dtype=torch.bfloat16), backend="auto")  # text: math
    finally:
        torch.set_num_threads(threads)
    assert calls == ["sdpa", "math"]


def test_plain_auto_is_sdpa_on_a_cpu_and_blocked_needs_accel(monkeypatch):
    calls = _record_kernels(monkeypatch)
    with torch.no_grad():
        for q, k, v in (_qkv(), _qkv(nq=8, nk=accel_attn.BLOCKED_MIN_KEYS, dtype=torch.bfloat16),
                        _qkv(nk=77, dtype=torch.bfloat16)):
            attention(q, k, v, backend="auto")
    assert calls == ["sdpa"] * 3  # the model's "auto" has no CPU choice: that is ldm.accel's
    with pytest.raises(ValueError, match="'blocked' is the CPU kernel of ldm.accel: call ldm.accel.optimize"):
        attention(*_qkv(), backend="blocked")
    with pytest.raises(ValueError, match="ldm.accel.optimize"):
        CrossAttention(32, backend="blocked")


def test_blocked_is_math_block_by_block_and_differentiable(monkeypatch):
    monkeypatch.setattr(accel_attn, "_BLOCK_SCORES", 64 * 8)  # several row blocks per head
    q, k, v = _qkv(nq=40, nk=64, d=16, dtype=torch.bfloat16)
    mask = torch.rand(2, 1, 40, 64) > 0.2
    mask[..., 0] = True
    with torch.no_grad():
        blocked = accel_attn.attention(q, k, v, backend="blocked", mask=mask)
        math = attention(q, k, v, backend="math", mask=mask)
    assert blocked.dtype == torch.bfloat16
    torch.testing.assert_close(blocked.float(), math.float(), atol=1e-2, rtol=0)  # one bf16 rounding apart
    qf = q.float().requires_grad_()
    accel_attn.attention(qf, k.float(), v.float(), backend="blocked").sum().backward()
    assert qf.grad is not None and qf.grad.abs().sum() > 0


@pytest.mark.skipif(not onednn.linear_available(), reason="no oneDNN linear op in this build")
def test_blocked_scores_are_fp32_products_on_onednn(monkeypatch):
    calls = []
    real = onednn._onednn_linear
    monkeypatch.setattr(onednn, "_onednn_linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(accel_attn, "_BLOCK_SCORES", 64 * 8)
    q, k, v = _qkv(nq=40, nk=64, d=16)
    with torch.no_grad():
        out = accel_attn.attention(q * 3, k * 3, v, backend="blocked")
    assert calls and set(calls) == {torch.float32}
    torch.testing.assert_close(out, _reference(q * 3, k * 3, v), atol=1e-5, rtol=1e-5)


def test_cross_attention_names_and_hand_computed_output():
    m = CrossAttention(32, context_dim=24, heads=4, dim_head=8)
    names = {k: tuple(p.shape) for k, p in m.state_dict().items()}
    assert names == {"to_q.weight": (32, 32), "to_k.weight": (32, 24), "to_v.weight": (32, 24),
                     "to_out.0.weight": (32, 32), "to_out.0.bias": (32,)}
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 24)
    split = lambda t: t.reshape(2, -1, 4, 8).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(x @ m.to_q.weight.T), split(ctx @ m.to_k.weight.T), split(ctx @ m.to_v.weight.T)
    expected = _reference(q, k, v).permute(0, 2, 1, 3).reshape(2, 6, 32) @ m.to_out[0].weight.T + m.to_out[0].bias
    torch.testing.assert_close(m(x, ctx), expected, atol=1e-5, rtol=1e-5)
    self_attn = CrossAttention(32, heads=2, dim_head=16)
    assert self_attn(x).shape == x.shape


def test_cross_attention_key_mask_hides_keys():
    m = CrossAttention(16, context_dim=16, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    changed = ctx.clone()
    changed[1, 3:] = 100.0
    for backend in ("sdpa", "math"):
        m.set_backend(backend)
        torch.testing.assert_close(m(x, ctx, mask=mask), m(x, changed, mask=mask))
        assert not torch.allclose(m(x, ctx), m(x, changed))


def test_feedforward_is_geglu():
    ff = FeedForward(16, dropout=0.0)
    assert tuple(ff.net[0].proj.weight.shape) == (128, 16) and tuple(ff.net[2].weight.shape) == (16, 64)
    assert isinstance(ff.net[1], nn.Dropout)
    x = torch.randn(3, 16)
    a, gate = (x @ ff.net[0].proj.weight.T + ff.net[0].proj.bias).chunk(2, dim=-1)
    expected = (a * F.gelu(gate)) @ ff.net[2].weight.T + ff.net[2].bias
    torch.testing.assert_close(ff(x), expected)


def test_basic_transformer_block_layout():
    block = BasicTransformerBlock(32, 4, 8, context_dim=24, checkpoint=False)
    assert tuple(block.attn1.to_k.weight.shape) == (32, 32)
    assert tuple(block.attn2.to_k.weight.shape) == (32, 24)
    assert all(n.eps == 1e-5 for n in (block.norm1, block.norm2, block.norm3))
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 3, 24)
    assert block(x, ctx).shape == x.shape
    no_self = BasicTransformerBlock(32, 4, 8, context_dim=24, disable_self_attn=True)
    assert tuple(no_self.attn1.to_k.weight.shape) == (32, 24)
    assert no_self(x, ctx).shape == x.shape


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_variants(use_linear):
    st = SpatialTransformer(32, 2, 16, depth=2, context_dim=24, use_linear=use_linear, use_checkpoint=False)
    assert st.norm.num_groups == 32 and st.norm.eps == 1e-6 and st.norm.affine
    assert st.proj_in.weight.dim() == (2 if use_linear else 4)
    assert not st.proj_out.weight.any() and not st.proj_out.bias.any()  # zero-initialised
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 24)
    torch.testing.assert_close(st(x, ctx), x)  # the zero proj_out makes a fresh block an identity
    _randomize(st)
    out = st(x, ctx)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_linear_and_conv_projections_compute_the_same():
    conv = SpatialTransformer(32, 2, 16, context_dim=24, use_linear=False, use_checkpoint=False)
    _randomize(conv)
    linear = SpatialTransformer(32, 2, 16, context_dim=24, use_linear=True, use_checkpoint=False)
    state = {k: (v.flatten(1) if k.startswith("proj_") and v.dim() == 4 else v) for k, v in conv.state_dict().items()}
    linear.load_state_dict(state, strict=True)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 24)
    torch.testing.assert_close(linear(x, ctx), conv(x, ctx), atol=1e-5, rtol=1e-5)


def test_set_attention_backend_switches_every_layer():
    st = SpatialTransformer(32, 2, 16, depth=2, context_dim=24, use_checkpoint=False)
    _randomize(st)
    x, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 24)
    expected = st(x, ctx)
    assert set_attention_backend(st, "math", slice_size=5) == 4
    assert {(m.backend, m.slice_size) for m in st.modules() if isinstance(m, CrossAttention)} == {("math", 5)}
    torch.testing.assert_close(st(x, ctx), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(st, "cuda")


def test_maybe_checkpoint_only_when_enabled_with_grad(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x = torch.randn(3, requires_grad=True)
    assert torch.equal(maybe_checkpoint(torch.sin, x, enabled=True), torch.sin(x))
    assert calls == [{"use_reentrant": False}]
    maybe_checkpoint(torch.sin, x, enabled=False)
    with torch.no_grad():
        maybe_checkpoint(torch.sin, x, enabled=True)
    assert len(calls) == 1
