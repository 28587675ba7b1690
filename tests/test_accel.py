"""ldm.accel.optimize: the CPU fast paths put onto a plain model and taken off again, with the model's state dict,
parameters and outputs unchanged, and weight changes made afterwards (a merged LoRA) taken into account."""
import copy
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save
from torch import nn

import ldm.accel
from ldm.accel import attention as accel_attn
from ldm.accel import onednn
from ldm.accel import unet as accel_unet
from ldm.models import attention as plain_attn
from ldm.models import unet as plain_unet
from test_unet import inputs, randomize, tiny
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _accel_modules(model: nn.Module) -> list[str]:
    return sorted({type(m).__qualname__ for m in model.modules() if type(m).__module__.startswith("ldm.accel")})


def _plain_and_optimized(**overrides):
    plain = randomize(tiny(**overrides)).eval()
    return plain, ldm.accel.optimize(copy.deepcopy(plain), device="cpu")


def test_models_do_not_import_accel():
    sources = sorted((ROOT / "ldm" / "models").rglob("*.py"))
    assert sources
    for path in sources:
        assert not re.search(r"^\s*(from|import)\s+(ldm\.accel|\.\.accel)", path.read_text(), re.M), path
    code = "import sys, ldm.models.unet; print(sorted(m for m in sys.modules if m.startswith('ldm.accel')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_plain_unet_holds_plain_layers_only():
    model = tiny(use_linear_in_transformer=False)
    assert _accel_modules(model) == []
    assert {type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))} == {nn.Linear, nn.Conv2d}


def test_optimize_swaps_the_unets_layers_in_place_and_keeps_every_parameter():
    model = tiny_model()
    net = model.model.diffusion_model
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = save({k: v.contiguous() for k, v in model.state_dict().items()})
    vae_and_text = [type(m) for m in list(model.first_stage_model.modules()) + list(model.cond_stage_model.modules())]

    assert ldm.accel.optimize(model, device="cpu") is model
    assert isinstance(net, accel_unet.UNetModel)
    assert _accel_modules(net) == ["Conv2d", "CrossAttention", "GroupNorm32", "Linear", "UNetModel"]
    assert {type(m) for m in net.modules() if isinstance(m, nn.Linear)} == {onednn.Linear}
    assert {type(m) for m in net.modules() if isinstance(m, nn.Conv2d)} == {onednn.Conv2d}
    assert {type(m) for m in net.modules() if isinstance(m, plain_attn.CrossAttention)} == {accel_attn.CrossAttention}
    # the VAE and the text encoder have no fast path: untouched
    assert [type(m) for m in list(model.first_stage_model.modules())
            + list(model.cond_stage_model.modules())] == vae_and_text
    # names, values, identity; a safetensors save is the same bytes
    assert dict(model.named_parameters()) == params and all(params[k] is p for k, p in model.named_parameters())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert save({k: v.contiguous() for k, v in after.items()}) == saved


def test_optimized_unet_gives_the_plain_outputs():
    plain, fast = _plain_and_optimized()
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, ctx), plain(x, t, ctx), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, reference = fast(x, t, ctx), plain(x, t, ctx)
    assert fast._weight_cache is not None  # the cached bf16 call ran
    torch.testing.assert_close(low.float(), reference.float(), atol=0.05, rtol=0.05)
    # training: the same gradients (fp32 on oneDNN's matmul, up to summation order)
    for model in (plain, fast):
        model.train()
        model(x, t, ctx).square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_optimize_is_idempotent_and_an_optimizer_built_before_keeps_working():
    net = randomize(tiny())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ldm.accel.optimize(net, device="cpu")
    x, t, ctx = inputs(batch=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = net(x, t, ctx)
    cache, classes = net._weight_cache, [type(m) for m in net.modules()]
    ldm.accel.optimize(net, device="cpu")
    assert [type(m) for m in net.modules()] == classes and net._weight_cache is cache  # nothing changed
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(x, t, ctx), first)
    net(x, t, ctx).square().mean().backward()
    optimizer.step()  # the optimizer's parameters are the model's: the step reaches the forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(net(x, t, ctx), first)


def _merge_lora_(linear: nn.Linear, rank: int = 2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, linear.in_features, generator=gen) * 0.3
    up = torch.randn(linear.out_features, rank, generator=gen) * 0.3
    with torch.no_grad():
        linear.weight += up @ down  # W += B A: a merged LoRA, in place


class _LoRA(nn.Module):
    """An unmerged LoRA around a linear layer: base(x) + up(down(x))."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base, self.down, self.up = base, nn.Linear(base.in_features, rank, bias=False), \
            nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.3)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("change", ["merged", "wrapped"])
def test_an_adapter_applied_after_optimize_takes_effect(change):
    plain, fast = _plain_and_optimized()
    x, t, ctx = inputs()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), autocast():
        before = fast(x, t, ctx)
    for model in (plain, fast):
        for i, block in enumerate(m for m in model.modules() if isinstance(m, plain_attn.CrossAttention)):
            if change == "merged":
                _merge_lora_(block.to_q, seed=i)
            else:
                torch.manual_seed(i)
                block.to_q = _LoRA(block.to_q)
    with torch.no_grad(), autocast():
        after = fast(x, t, ctx)
        # what a model optimized after the change gives, bit for bit: the bf16 copy and the packs were remade
        fresh = ldm.accel.optimize(copy.deepcopy(plain), device="cpu")(x, t, ctx)
        reference = plain(x, t, ctx)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)
    torch.testing.assert_close(after.float(), reference.float(), atol=0.05, rtol=0.05)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, ctx), plain(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_restore_gives_back_the_plain_model():
    plain, fast = _plain_and_optimized()
    x, t, ctx = inputs()
    fast.set_attention_backend("blocked")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x, t, ctx)
    assert fast._weight_cache is not None
    assert ldm.accel.restore(fast) is fast
    assert type(fast) is plain_unet.UNetModel and _accel_modules(fast) == []
    assert not {"_weight_cache", "_in_cached_call"} & set(fast.__dict__)
    # "blocked" computes math's numbers; the plain model has no blocked kernel
    assert fast.attention_backend == "math"
    assert {m.backend for m in fast.modules() if isinstance(m, plain_attn.CrossAttention)} == {"math"}
    assert fast.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, ctx), plain(x, t, ctx), atol=1e-5, rtol=1e-5)
    ldm.accel.optimize(fast, device="cpu")
    assert _accel_modules(fast)
    ldm.accel.optimize(fast, device="cpu", enabled=False)
    assert _accel_modules(fast) == []


def test_device_and_precision_choose_the_paths():
    net = tiny()
    ldm.accel.optimize(net, device="cuda")  # only classes change, no GPU is needed: nothing for CUDA here
    assert _accel_modules(net) == []
    ldm.accel.optimize(net, device="cpu", precision="fp32")
    assert _accel_modules(net) == ["Conv2d", "CrossAttention", "Linear"]  # no bf16 paths
    ldm.accel.optimize(net, device=torch.device("cpu"), precision="bf16")
    assert _accel_modules(net) == ["Conv2d", "CrossAttention", "GroupNorm32", "Linear", "UNetModel"]
    ldm.accel.optimize(net, device="cuda:0")  # moving on: what the CPU pass added is taken off
    assert _accel_modules(net) == []
    ldm.accel.optimize(net)  # None: the device of the parameters
    assert "UNetModel" in _accel_modules(net)
    with pytest.raises(ValueError, match="unknown precision 'int8' for ldm.accel.optimize"):
        ldm.accel.optimize(net, precision="int8")


def test_attention_block_unets_get_the_cpu_kernels_too():
    net = ldm.accel.optimize(randomize(tiny(use_spatial_transformer=False, context_dim=None)), device="cpu")
    blocks = [m for m in net.modules() if isinstance(m, plain_unet.AttentionBlock)]
    assert blocks and all(type(m) is accel_attn.AttentionBlock for m in blocks)
    net.set_attention_backend("blocked")
    x, t, _ = inputs()
    with torch.no_grad():
        blocked = net(x, t)
        net.set_attention_backend("math")
        torch.testing.assert_close(blocked, net(x, t), atol=1e-5, rtol=1e-5)


def test_store_weights_in_keeps_norms_fp32():
    net = ldm.accel.optimize(randomize(tiny()), device="cpu")
    x, t, ctx = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = net(x, t, ctx)
        ldm.accel.store_weights_in_(net, torch.bfloat16)
        assert net._weight_cache is None
        stored = net(x, t, ctx)
    assert torch.equal(stored, cast)  # exactly what autocast (and the cache) would have cast them to
    assert net.out[2].weight.dtype == torch.bfloat16 and net.out[0].weight.dtype == torch.float32


@pytest.mark.parametrize("lightning, precision", [("32-true", "fp32"), ("bf16-mixed", "bf16"),
                                                  ("16-mixed", "fp16"), ("bf16-true", "bf16")])
def test_trainer_callback_optimizes_for_the_trainers_device_and_precision(lightning, precision):
    from ldm.training.callbacks import AccelCallback, _accel_precision

    assert _accel_precision(lightning) == precision
    net = tiny()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision=lightning)
    AccelCallback().setup(trainer, net, "fit")
    assert isinstance(net.time_embed[0], onednn.Linear)
    assert isinstance(net, accel_unet.UNetModel) == (precision == "bf16")


def _bf16_call(net, x, t, ctx):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x, t, ctx)


def test_context_projections_are_kept_across_calls_and_never_stale():
    plain, fast = _plain_and_optimized(use_linear_in_transformer=True)
    x, t, ctx = inputs()
    first = _bf16_call(fast, x, t, ctx)
    store = fast._weight_cache[4]
    layers = [m for m in fast.modules() if isinstance(m, accel_attn.CrossAttention) and m.to_k.in_features == 16]
    assert len(store) == len(layers) > 0  # one entry per cross-attention layer
    kept = dict(store._projections)
    # the same context, as the same tensor and as a new equal one (CFG concatenates it anew in every step)
    assert torch.equal(_bf16_call(fast, x, t, ctx), first)
    assert torch.equal(_bf16_call(fast, x, t, torch.cat([ctx[:1], ctx[1:]])), first)
    assert all(store._projections[k][0] is v[0] for k, v in kept.items())  # reused, not made again
    fast.cache_context_projections = False
    assert torch.equal(_bf16_call(fast, x, t, ctx), first)  # the same numbers without the store
    fast.cache_context_projections = True
    # another context, a context changed in place, a weight changed in place: the outputs of a fresh model
    for change in ("new", "in place", "weight"):
        if change == "new":
            ctx = torch.randn_like(ctx)
        elif change == "in place":
            ctx.mul_(0.5)
        else:
            for model in (plain, fast):
                _merge_lora_(layers[0].to_k if model is fast else
                             [m for m in model.modules() if isinstance(m, plain_attn.CrossAttention)
                              and m.to_k.in_features == 16][0].to_k)
        fresh = _bf16_call(ldm.accel.optimize(copy.deepcopy(plain), device="cpu"), x, t, ctx)
        assert torch.equal(_bf16_call(fast, x, t, ctx), fresh), change
    torch.testing.assert_close(fresh.float(), _bf16_call(plain, x, t, ctx).float(), atol=0.05, rtol=0.05)


def test_context_projections_skip_hooked_layers():
    _, fast = _plain_and_optimized()
    x, t, ctx = inputs()
    first = _bf16_call(fast, x, t, ctx)
    layer = next(m for m in fast.modules() if isinstance(m, accel_attn.CrossAttention) and m.to_k.in_features == 16)
    handle = layer.to_k.register_forward_hook(lambda module, args, out: out * 2)  # e.g. an unmerged LoRA's hook
    try:
        assert not torch.equal(_bf16_call(fast, x, t, ctx), first)  # the hook ran: not taken from the store
    finally:
        handle.remove()
    assert torch.equal(_bf16_call(fast, x, t, ctx), first)
