"""The UNet's fast paths (channels-last layout; from ldm.accel: bf16 GroupNorm under autocast, cached bf16
weights, packed oneDNN convolutions, oneDNN fp32 products) keep the reference numerics."""
import pytest
import torch
import torch.nn.functional as F

import ldm.accel
from ldm.accel import onednn
from ldm.accel.unet import GroupNorm32
from ldm.models import unet as plain_unet
from test_unet import tiny


def accelerated(**overrides):
    """A randomized channels-last UNet after ``ldm.accel.optimize`` (CPU, every precision's paths)."""
    return ldm.accel.optimize(randomized_pair(**overrides)[0], device="cpu")


def randomized_pair(**overrides):
    """The same random weights in a channels-last and a reference-layout UNet."""
    fast, ref = tiny(channels_last=True, **overrides), tiny(channels_last=False, **overrides)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def test_channels_last_changes_strides_only():
    fast, ref = randomized_pair()
    conv = fast.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert ref.input_blocks[0][0].weight.is_contiguous()
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    out = fast(x, t, ctx)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_channels_last_survives_loading_and_trains_the_same():
    fast, ref = randomized_pair(use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)
    fast.load_state_dict({k: v.contiguous() for k, v in ref.state_dict().items()})
    assert fast.out[2].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    fast(x, t, ctx).square().mean().backward()
    ref(x, t, ctx).square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_groupnorm_under_bf16_autocast_matches_fp32_reference():
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
        norm.bias.copy_(torch.randn(64))
    x = (torch.randn(2, 64, 8, 8) * 3 + 1).bfloat16()
    reference = norm(x)  # no autocast: upcast to fp32, cast back
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = norm(x)
    assert fast.dtype == reference.dtype == torch.bfloat16
    # at most one bf16 rounding step apart (relative 2**-7), and usually identical
    torch.testing.assert_close(fast.float(), reference.float(), atol=2e-2, rtol=2**-7)
    assert (fast != reference).float().mean() < 0.5 and not torch.equal(fast, reference)
    # recorded for autograd (training), the reference upcast runs: its bf16 backward is the slower one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x.requires_grad_()), reference)


def test_groupnorm_fp32_is_the_reference_exactly():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-5))


def test_plain_groupnorm_is_the_reference_under_bf16_autocast_too():
    plain = plain_unet.GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 8, 8) * 3 + 1).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    assert torch.equal(out, F.group_norm(x.float(), 32, plain.weight, plain.bias, 1e-5).bfloat16())


def test_bf16_autocast_forward_close_to_fp32():
    fast = accelerated()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x, t, ctx)
    high = fast(x, t, ctx)
    assert (low.float() - high).abs().mean() < 0.02 * high.abs().mean()


def test_cached_bf16_call_is_skipped_under_torch_compile(monkeypatch):
    """dynamo would guard on the Python-side cache and packs (recompiling per conv); traced code runs plain."""
    fast = accelerated()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast._cached_weights_dtype(x) == torch.bfloat16
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fast._cached_weights_dtype(x) is None


def test_bf16_inference_runs_on_cached_weights_and_matches_autocast():
    fast = accelerated()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.cache_cast_weights = False
        plain = fast(x, t, ctx)
        assert fast._weight_cache is None
        fast.cache_cast_weights = True
        first = fast(x, t, ctx)
        cache = fast._weight_cache[1]
        second = fast(x, t, ctx)
        assert fast._weight_cache[1] is cache  # reused, not re-cast
    assert cache["out.2.weight"].dtype == torch.bfloat16
    assert cache["out.2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, second)
    torch.testing.assert_close(first.float(), plain.float(), atol=0.05, rtol=0.05)


def test_weight_cache_follows_weight_changes_and_is_skipped_when_training():
    fast = accelerated()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = fast(x, t, ctx)
        fast.out[2].bias.add_(1.0)  # an in-place update (optimizer step, EMA copy, load_state_dict)
        after = fast(x, t, ctx)
    torch.testing.assert_close(after.float() - before.float(), torch.ones_like(before.float()), atol=0.02, rtol=0)
    fast.clear_weight_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x, t, ctx)
    assert fast._weight_cache is None  # grad enabled: autocast's own casts, gradients reach the fp32 weights
    out.float().sum().backward()
    assert fast.out[2].weight.grad is not None and fast.out[2].weight.grad.dtype == torch.float32


needs_onednn = pytest.mark.skipif(not onednn.available(), reason="no oneDNN bf16 convolution in this build")


@needs_onednn
def test_packed_conv_matches_conv2d_and_repacks_when_needed():
    conv = onednn.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    packs = onednn.ConvPacks()
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = conv(x.bfloat16())
        assert len(packs) == 0                             # no context: nn.Conv2d's own path
        with onednn.packed_convolutions(packs):
            packed = conv(x)                               # float32 input is cast, as autocast would
            assert len(packs) == 1 and torch.equal(packed, plain)
            first = packs._packs[id(conv)][1]
            conv(x)
            assert packs._packs[id(conv)][1] is first      # packed once per shape
            other = torch.randn(1, 8, 12, 12).bfloat16()
            torch.testing.assert_close(conv(other), F.conv2d(other, conv.weight, conv.bias, padding=1), atol=0, rtol=0)
            conv.weight.mul_(2)                            # an in-place change makes a new pack
            torch.testing.assert_close(conv(x), 2 * plain - conv.bias.view(1, -1, 1, 1), atol=0.05, rtol=0.02)
            assert len(packs) == 1
    with onednn.packed_convolutions(packs):                # grad enabled or a float32 weight: not packed
        conv.float()
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


@needs_onednn
def test_unet_bf16_inference_packs_every_conv_once_with_the_same_output():
    fast = accelerated(position_embedding=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fast.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.pack_conv_weights = False
        plain = fast(x, t, ctx)
        assert len(fast._weight_cache[2]) == 0
        fast.pack_conv_weights = True
        packed = fast(x, t, ctx)
        assert len(fast._weight_cache[2]) == convs
        fast.out[2].bias.add_(1.0)                         # the weights change: a new cache, new packs
        shifted = fast(x, t, ctx)
    assert torch.equal(packed, plain)
    torch.testing.assert_close(shifted.float() - packed.float(), torch.ones_like(plain.float()), atol=0.02, rtol=0)

    # The packs are a cache: a copy (or a pickle) of the model starts without them and makes its own.
    import copy
    import pickle

    twin = copy.deepcopy(fast)
    assert len(twin._weight_cache[2]) == 0 and len(pickle.loads(pickle.dumps(fast._weight_cache[2]))) == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(twin(x, t, ctx), shifted)


needs_linear_packing = pytest.mark.skipif(not onednn.linear_packing_available(),
                                          reason="no oneDNN bf16 linear packing in this build")


@needs_linear_packing
def test_packed_linear_matches_linear_and_repacks_when_needed():
    layer = onednn.Linear(24, 40).to(torch.bfloat16)
    packs = onednn.LinearPacks()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        plain = F.linear(x.bfloat16(), layer.weight, layer.bias)
        assert torch.equal(layer(x.bfloat16()), plain) and len(packs) == 0  # no context: nn.Linear's own path
        with onednn.packed_linears(packs):
            packed = layer(x)                              # float32 input is cast, as autocast would
            assert len(packs) == 1 and packed.shape == (2, 5, 40) and packed.dtype == torch.bfloat16
            torch.testing.assert_close(packed.float(), plain.float(), atol=1e-2, rtol=1e-2)
            first = packs._packs[id(layer)][1]
            assert torch.equal(layer(x), packed) and packs._packs[id(layer)][1] is first  # packed once per shape
            rows = torch.randn(24, 7).t()                  # another row count, strided rows
            torch.testing.assert_close(layer(rows).float(), F.linear(rows.bfloat16(), layer.weight, layer.bias).float(),
                                       atol=1e-2, rtol=1e-2)
            layer.weight.mul_(2)                           # an in-place change makes a new pack
            torch.testing.assert_close(layer(x).float(), (2 * plain - layer.bias).float(), atol=5e-2, rtol=2e-2)
            assert len(packs) == 1
    with onednn.packed_linears(packs):                     # grad enabled: not packed
        layer.float()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_linear_packing
def test_unet_bf16_inference_packs_every_linear_once_with_the_same_output():
    fast = accelerated()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    linears = sum(isinstance(m, torch.nn.Linear) for m in fast.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.pack_linear_weights = False
        plain = fast(x, t, ctx)
        assert len(fast._weight_cache[3]) == 0
        fast.pack_linear_weights = True
        packed = fast(x, t, ctx)
        assert len(fast._weight_cache[3]) == linears
        again = fast(x, t, ctx)
    torch.testing.assert_close(packed.float(), plain.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(again, packed)


needs_onednn_linear = pytest.mark.skipif(not onednn.linear_available(), reason="no oneDNN linear op in this build")


@needs_onednn_linear
@pytest.mark.parametrize("shape, bias", [((2, 33, 24), True), ((5, 24), False)])
def test_onednn_linear_matches_nn_linear_forward_and_backward(monkeypatch, shape, bias):
    calls = []
    real = onednn._onednn_linear
    monkeypatch.setattr(onednn, "_onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    fast = onednn.Linear(24, 40, bias=bias)
    plain = torch.nn.Linear(24, 40, bias=bias)
    plain.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(*shape)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fast(xf)
    grad = torch.randn_like(out)
    out.backward(grad)
    plain(xp).backward(grad)
    assert len(calls) == 3                                 # forward, input gradient, weight gradient
    torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, atol=1e-5, rtol=1e-5)
    fast.weight.grad = None
    fast.weight.requires_grad_(False)                      # a frozen weight: no weight-gradient product
    fast(xf).sum().backward()
    assert len(calls) == 5 and fast.weight.grad is None


@needs_onednn_linear
def test_onednn_linear_leaves_bf16_and_autocast_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(onednn, "_onednn_linear", lambda *a: calls.append(1))
    fast = onednn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
    assert fast.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert fast.double()(x.double()).dtype == torch.float64
    assert calls == []


@needs_onednn_linear
def test_pointwise_conv_runs_as_onednn_linear_on_channels_last_fp32(monkeypatch):
    calls = []
    real = onednn._onednn_linear
    monkeypatch.setattr(onednn, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    conv = onednn.Conv2d(12, 20, 1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = conv(xf)
    assert calls == [1] and out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    out.backward(grad)
    weight = conv.weight.detach().clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    expected = F.conv2d(xp, weight, bias)
    expected.backward(grad)
    assert len(calls) == 3                                 # forward, input gradient, weight gradient
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad, xp.grad, atol=1e-5, rtol=1e-5)
    assert conv.weight.grad.shape == (20, 12, 1, 1)
    torch.testing.assert_close(conv.weight.grad, weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.bias.grad, bias.grad, atol=1e-5, rtol=1e-5)
    conv(x.contiguous())                                   # NCHW input, a 3x3 or a strided 1x1: torch's conv
    onednn.Conv2d(12, 20, 3, padding=1)(x)
    onednn.Conv2d(12, 20, 1, stride=2)(x)
    assert len(calls) == 3
