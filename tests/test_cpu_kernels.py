"""The compiled fused attention kernel (ldm.accel.cpu_kernels): numbers against an fp64 reference and the Python
blocked kernel, the choice of "auto", the UNet with it, and the fallback when it cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.accel import attention as accel_attn
from ldm.accel import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"no fused CPU attention kernel here: {cpu_kernels.reason()}")


def _reference(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()


def _python_blocked(q, k, v, monkeypatch):
    monkeypatch.setattr(accel_attn, "USE_CPU_KERNELS", False)
    try:
        with torch.no_grad():
            return accel_attn.attention(q, k, v, backend="blocked")
    finally:
        monkeypatch.setattr(accel_attn, "USE_CPU_KERNELS", True)


# (batch, heads, queries, keys, head dim, value dim): SD's shapes at small size, and odd counts that leave tails in
# every loop (query rows not a multiple of 8, keys not a multiple of 16, value widths that need 1-8 vectors)
SHAPES = [(2, 2, 256, 256, 40, 40), (2, 2, 64, 77, 80, 80), (1, 3, 37, 6, 10, 10), (1, 2, 19, 33, 160, 160),
          (2, 1, 9, 17, 64, 250), (1, 1, 1, 1, 2, 1), (2, 2, 130, 300, 32, 24)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernel_matches_fp64_as_closely_as_the_python_blocks(shape, monkeypatch):
    b, h, n, m, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, h, n, d, generator=g).bfloat16()
    k = (torch.randn(b, h, m, d, generator=g) * 2).bfloat16()  # logits of ~2x unit variance
    v = torch.randn(b, h, m, dv, generator=g).bfloat16()
    ref = _reference(q, k, v)
    with torch.no_grad():
        fused = cpu_kernels.attention(q, k, v)
    assert fused.shape == (b, h, n, dv) and fused.dtype == torch.bfloat16
    err = (fused.double() - ref).abs()
    err_py = (_python_blocked(q, k, v, monkeypatch).double() - ref).abs()
    assert err.max() <= max(1.5 * err_py.max().item(), 1e-2)  # one bf16 rounding of outputs of magnitude ~1
    assert err.mean() <= 1.25 * err_py.mean() + 1e-6


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernel_in_fp32_is_the_math_kernel(shape):
    b, h, n, m, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    q, k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g) * 2, torch.randn(
        b, h, m, dv, generator=g)
    ref = _reference(q, k, v)
    with torch.no_grad():
        fused = cpu_kernels.attention(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert fused.dtype == torch.float32
    assert (fused.double() - ref).abs().max() <= max(4 * (sdpa.double() - ref).abs().max().item(), 2e-6)


@needs_kernel
def test_fused_kernel_probabilities_are_rounded_once(monkeypatch):
    """With v the identity, the output is the probabilities themselves: each within one bf16 rounding (2^-8
    relative) of fp64's, as the reference's (fp32 softmax, probabilities cast to bf16) are; a sloppier exponential
    or a second rounding shows here while the outputs of random v hide it."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 64, 16, generator=g).bfloat16()
    k = (torch.randn(1, 2, 200, 16, generator=g) * 2).bfloat16()
    v = torch.eye(200).bfloat16().expand(1, 2, 200, 200).contiguous()
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5, -1)
    with torch.no_grad():
        rel = (cpu_kernels.attention(q, k, v).double() - ref).abs() / ref
    rel_py = (_python_blocked(q, k, v, monkeypatch).double() - ref).abs() / ref
    assert rel.max() <= 2 ** -8 + 1e-5
    assert rel.mean() <= 1.05 * rel_py.mean()


@needs_kernel
def test_fused_kernel_takes_strided_views_broadcast_keys_and_a_scale():
    g = torch.Generator().manual_seed(0)
    b, h, n, m, d = 2, 4, 50, 70, 16
    # as the attention layers hand it over: heads split out of [B, N, H * D] projections (strided views)
    q = torch.randn(b, n, h * d, generator=g).bfloat16().reshape(b, n, h, d).transpose(1, 2)
    k = torch.randn(1, m, h * d, generator=g).bfloat16().reshape(1, m, h, d).transpose(1, 2)
    v = torch.randn(1, m, h * d, generator=g).bfloat16().reshape(1, m, h, d).transpose(1, 2)
    assert not q.is_contiguous()
    with torch.no_grad():
        out = cpu_kernels.attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), scale=0.3)
        out1 = cpu_kernels.attention(q, k, v, scale=0.3)  # a batch of one broadcasts too
    ref = _reference(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)
    assert torch.equal(out, out1)
    # the output is a view of [B, N, H, Dv]: merging the heads back is free
    assert out.transpose(1, 2).is_contiguous()


@needs_kernel
def test_fused_kernel_threads_give_the_same_numbers():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 90, 24, generator=g).bfloat16() for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.attention(q, k, v)
        torch.set_num_threads(2)
        two = cpu_kernels.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # the work is split by blocks of rows, each computed the same way


def _spy_on_autograd(monkeypatch, calls: list) -> None:
    real = cpu_kernels._Attention
    monkeypatch.setattr(cpu_kernels, "_Attention", type("Spy", (), {
        "apply": staticmethod(lambda *a: calls.append(1) or real.apply(*a))}))


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(g)
    return [t.grad for t in (q, k, v)]


def _math_bf16(q, k, v):
    """The math kernel as the reference computes attention under bf16 autocast: fp32 scores and softmax, the
    probabilities rounded to bf16, a bf16 product with v."""
    with torch.autocast("cpu", enabled=False):
        p = ((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    return p.to(v.dtype) @ v


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES[:2] + [(1, 3, 130, 200, 80, 24), (2, 1, 9, 17, 64, 250)])
def test_fused_backward_matches_fp64_as_closely_as_the_math_kernel(shape):
    b, h, n, m, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape) + 2)
    q = torch.randn(b, h, n, d, generator=g).bfloat16()
    k = (torch.randn(b, h, m, d, generator=g) * 2).bfloat16()
    v = torch.randn(b, h, m, dv, generator=g).bfloat16()
    dout = torch.randn(b, h, n, dv, generator=g).bfloat16()
    ref = _grads(_reference, q.double(), k.double(), v.double(), dout.double())
    ours = _grads(cpu_kernels.attention, q, k, v, dout)
    math = _grads(_math_bf16, q, k, v, dout)
    for name, a, f, r in zip("qkv", ours, math, ref):
        assert a.dtype == torch.bfloat16 and a.shape == r.shape
        err, err_math = (a.double() - r).abs(), (f.double() - r).abs()
        assert err.max() <= 1.5 * err_math.max() + 1e-3 * r.abs().max(), name
        # dS rounded to bf16 for dK and dQ (FlashAttention-2's choice; the reference keeps it in fp32): 1.0-1.5x
        assert err.mean() <= (1.6 if name in "qk" else 1.05) * err_math.mean(), name


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES[:2] + [(1, 3, 130, 200, 80, 24), (2, 1, 9, 17, 63, 250)])
def test_fused_backward_in_fp32_is_the_math_kernels(shape):
    b, h, n, m, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape) + 3)
    q, k, v, dout = (torch.randn(b, h, rows, w, generator=g) for rows, w in ((n, d), (m, d), (m, dv), (n, dv)))
    ref = _grads(_reference, q.double(), k.double(), v.double(), dout.double())
    ours = _grads(cpu_kernels.attention, q, k, v, dout)
    math = _grads(_math_bf16, q, k, v, dout)  # in fp32: the plain math
    for name, a, f, r in zip("qkv", ours, math, ref):
        assert a.dtype == torch.float32
        assert (a.double() - r).abs().max() <= 4 * (f.double() - r).abs().max() + 1e-6 * r.abs().max(), name


@needs_kernel
def test_fused_backward_of_strided_views_and_through_auto(monkeypatch):
    """The attention layers' strided q, k, v ([B, N, H * D] projections split into heads): "auto" takes the fused
    kernel for bf16 training too, and its gradients are those of contiguous copies."""
    calls = []
    _spy_on_autograd(monkeypatch, calls)
    g = torch.Generator().manual_seed(4)
    b, h, n, d = 2, 3, 40, 8
    proj = [torch.randn(b, n, h * d, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    q, k, v = (p.view(b, n, h, d).transpose(1, 2) for p in proj)
    dout = torch.randn(b, h, n, d, generator=g).bfloat16()
    accel_attn.attention(q, k, v, backend="auto").backward(dout)
    assert calls == [1]
    contiguous = _grads(cpu_kernels.attention, *(t.detach().contiguous() for t in (q, k, v)), dout)
    for p, c in zip(proj, contiguous):
        assert torch.equal(p.grad.view(b, n, h, d).transpose(1, 2), c)
    assert cpu_kernels.trains(q.float(), k.float(), v.float())
    assert not cpu_kernels.trains(q, k[:1].expand(b, -1, -1, -1), v[:1].expand(b, -1, -1, -1))  # broadcast keys


@needs_kernel
def test_accelerated_unet_trains_in_bf16_on_the_fused_backward(monkeypatch):
    """A bf16 training step of the accelerated UNet: loss and gradients as with the math kernel, a few bf16
    roundings apart."""
    import ldm.accel
    from test_unet import inputs, randomize, tiny

    torch.manual_seed(0)
    net = ldm.accel.optimize(randomize(tiny()), device="cpu")
    x, t, c = inputs(size=16, ctx_len=77)

    def step():
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x, t, c).float().pow(2).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in net.parameters()])

    calls = []
    _spy_on_autograd(monkeypatch, calls)
    loss, grad = step()
    assert calls
    monkeypatch.setattr(accel_attn, "USE_CPU_KERNELS", False)
    loss_ref, grad_ref = step()
    assert abs(loss - loss_ref) <= 0.02 * abs(loss_ref)
    assert (grad - grad_ref).norm() <= 0.05 * grad_ref.norm()


def test_fits_refuses_what_the_kernel_does_not_take():
    q = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    assert cpu_kernels.fits(q, q, q)
    assert cpu_kernels.fits(q.float(), q.float(), q.float())
    assert not cpu_kernels.fits(q.half(), q.half(), q.half())  # fp16
    assert not cpu_kernels.fits(q, q.float(), q)  # mixed
    odd = torch.zeros(1, 2, 8, 15, dtype=torch.bfloat16)
    assert not cpu_kernels.fits(odd, odd, odd)  # odd head dim in bf16 (pairs)
    assert cpu_kernels.fits(odd.float(), odd.float(), odd.float())
    wide = torch.zeros(1, 2, 8, cpu_kernels.MAX_HEAD_DIM + 2, dtype=torch.bfloat16)
    assert not cpu_kernels.fits(wide, wide, wide)
    assert not cpu_kernels.fits(q, torch.zeros(3, 2, 8, 16, dtype=torch.bfloat16), q)  # batch 3 against 1
    assert not cpu_kernels.fits(q, q, q.transpose(2, 3))  # a value dimension that is not contiguous
    grad = q.float().requires_grad_().bfloat16()
    assert not cpu_kernels.fits(grad, q, q)  # autograd: the kernel has no backward
    with torch.no_grad():
        assert cpu_kernels.fits(grad, q, q)


@needs_kernel
def test_auto_takes_the_fused_kernel_at_any_thread_count(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "attention",
                        lambda *a, f=cpu_kernels.attention, **kw: calls.append("fused") or f(*a, **kw))
    g = torch.Generator().manual_seed(2)
    text = [torch.randn(2, 2, 64, 16, generator=g).bfloat16()] + [
        torch.randn(2, 2, 77, 16, generator=g).bfloat16() for _ in range(2)]
    fmap = [torch.randn(2, 2, 256, 16, generator=g).bfloat16() for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                accel_attn.attention(*fmap, backend="auto")
                accel_attn.attention(*text, backend="auto")
                mask = torch.ones(2, 1, 1, 77, dtype=torch.bool)
                accel_attn.attention(*text, backend="auto", mask=mask)  # a mask: not the fused kernel
    finally:
        torch.set_num_threads(threads)
    assert calls == ["fused", "fused"] * 2
    fp32 = [t.float() for t in fmap]
    with torch.no_grad():
        accel_attn.attention(*fp32, backend="auto")
    assert len(calls) == 5  # fp32 inference too
    accel_attn.attention(*[t.requires_grad_() for t in fp32], backend="auto")
    assert len(calls) == 6  # training too, with the kernel's backward (tested below)


@needs_kernel
def test_accelerated_unet_in_bf16_matches_the_python_blocks(monkeypatch):
    import ldm.accel
    from test_unet import inputs, randomize, tiny

    torch.manual_seed(0)
    fast = ldm.accel.optimize(randomize(tiny()).eval(), device="cpu", precision="bf16")
    x, t, c = inputs(size=16, ctx_len=77)  # 256 pixels at the first level, a 77-token context
    calls = []
    monkeypatch.setattr(cpu_kernels, "attention",
                        lambda *a, f=cpu_kernels.attention, **kw: calls.append(1) or f(*a, **kw))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fast(x, t, c).float()
        monkeypatch.setattr(accel_attn, "USE_CPU_KERNELS", False)
        python = fast(x, t, c).float()
    assert calls  # the UNet's attention went through the fused kernel
    scale = python.abs().max()
    assert (fused - python).abs().max() <= 0.05 * scale  # bf16 inference: a few roundings apart
    assert (fused - python).abs().mean() <= 0.005 * scale


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_without_a_compiler_attention_falls_back_with_one_line(tmp_path):
    code = ("import torch, logging; logging.basicConfig(level=logging.WARNING)\n"
            "from ldm.accel import attention as A, cpu_kernels as K\n"
            "q = torch.randn(1, 2, 300, 16).bfloat16()\n"
            "with torch.no_grad(): out = A.attention(q, q, q, backend='auto')\n"
            "print('available', K.available(), out.shape[2])\n")
    done = _fresh(code, CXX=str(tmp_path / "no-such-compiler"), PATH=str(tmp_path), LDM_KERNEL_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "available False 300" in done.stdout
    if cpu_kernels.supports_cpu():  # on another CPU the kernel is not even tried, and nothing is logged
        warnings = [ln for ln in done.stderr.splitlines() if "fused CPU attention kernel" in ln]
        assert len(warnings) == 1 and "no C++ compiler found" in warnings[0]
    done = _fresh(code, LDM_CPU_KERNELS="0")
    assert "available False 300" in done.stdout and "fused CPU attention" not in done.stderr


def test_build_is_cached_by_source_and_written_atomically(tmp_path, monkeypatch):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("LDM_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "attention.cpp"  # a one-line source: the build steps, not the kernel's compile time
    source.write_text("extern \"C\" int f() { return 1; }\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    first = cpu_kernels.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp  # found, not compiled again
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind
    assert cpu_kernels.build(force=True) == first and first.stat().st_mtime_ns != stamp  # force: compiled again
    source.write_text("extern \"C\" int f() { return 2; }\n")
    second = cpu_kernels.build()
    assert second != first  # another source (or compiler, or flags): another file
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ["-DLDM_TEST_FLAG=1"])
    assert cpu_kernels.library_path()[1] not in (first, second)
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ["-fno-such-option"])
    with pytest.raises(RuntimeError, match="failed on attention.cpp"):
        cpu_kernels.build()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])  # nothing left over


def test_a_cache_others_may_write_is_refused(tmp_path, monkeypatch):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler here")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LDM_KERNEL_CACHE", str(cache))
    source = tmp_path / "attention.cpp"
    source.write_text("extern \"C\" int f() { return 1; }\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    built = cpu_kernels.build()
    built.chmod(0o666)  # a library anyone could have replaced
    with pytest.raises(RuntimeError, match="refusing to load kernels from .*writable by others"):
        cpu_kernels.build()
    built.chmod(0o755)
    cache.chmod(0o777)  # a shared folder: the file could be swapped
    with pytest.raises(RuntimeError, match="refusing to load kernels from .*cache"):
        cpu_kernels.build()
    cache.chmod(0o755)
    assert cpu_kernels.build() == built
