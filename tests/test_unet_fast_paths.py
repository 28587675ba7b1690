"""The UNet's CPU fast paths (channels-last layout, bf16 GroupNorm under autocast) keep the reference numerics."""
import torch

from ldm.models.unet import GroupNorm32
from test_unet import tiny




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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = norm(x)
    assert fast.dtype == reference.dtype == torch.bfloat16
    # at most one bf16 rounding step apart (relative 2**-7), and usually identical
    torch.testing.assert_close(fast.float(), reference.float(), atol=2e-2, rtol=2**-7)
    assert (fast != reference).float().mean() < 0.5


def test_groupnorm_fp32_is_the_reference_exactly():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-5))


def test_bf16_autocast_forward_close_to_fp32():
    fast, _ = randomized_pair()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x, t, ctx)
    high = fast(x, t, ctx)
    assert (low.float() - high).abs().mean() < 0.02 * high.abs().mean()


def test_bf16_inference_runs_on_cached_weights_and_matches_autocast():
    fast, _ = randomized_pair()
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
    fast, _ = randomized_pair()
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
