"""Denoiser wrappers (eps / v / x0), classifier-free guidance and inpainting helpers."""

import pytest
import torch

from ldm.diffusion.denoisers import (
    DiscreteDenoiser,
    EpsDenoiser,
    VDenoiser,
    X0Denoiser,
    make_denoiser,
    prediction_target,
    scalings,
)
from ldm.diffusion.guidance import CFGDenoiser, rescale_guidance
from ldm.diffusion.inpaint import InpaintDenoiser
from ldm.diffusion import samplers as SM
from ldm.diffusion.schedules import alpha_bar_to_sigma
from test_diffusion_analytic import GaussianData, MixtureData, discrete_net, sd_alphas_cumprod

AC = sd_alphas_cumprod()
DATA = MixtureData()


@pytest.mark.parametrize("quantize", [True, False])
def test_eps_v_x0_wrappers_give_the_same_exact_denoiser(quantize):
    grid = alpha_bar_to_sigma(AC)
    off_grid = torch.tensor([0.05, 0.37, 1.9, 7.3, 14.0], dtype=torch.float64)
    sigma = grid[[0, 10, 300, 700, 999]] if quantize else off_grid
    x = torch.randn(5, 1, dtype=torch.float64) * (1 + sigma[:, None])
    expected = DATA.denoise(x, sigma)
    for cls, name in ((EpsDenoiser, "eps"), (VDenoiser, "v"), (X0Denoiser, "x0")):
        denoiser = cls(discrete_net(DATA, AC, name), AC, quantize=quantize)
        assert denoiser.parameterization == name
        torch.testing.assert_close(denoiser(x, sigma), expected, rtol=1e-7, atol=1e-7)


def test_quantized_denoiser_feeds_the_nearest_integer_timestep():
    seen = []
    net = lambda x_in, t, cond: seen.append((t, cond)) or torch.zeros_like(x_in)
    denoiser = EpsDenoiser(net, AC)
    grid = alpha_bar_to_sigma(AC)
    between = torch.exp(0.3 * grid[41].log() + 0.7 * grid[42].log())
    denoiser(torch.zeros(2, 3), torch.stack([grid[5], between]), cond={"crossattn": "opaque"})
    t, cond = seen[-1]
    assert t.dtype == torch.int64 and t.tolist() == [5, 42]
    assert cond == {"crossattn": "opaque"}  # passed through untouched
    fractional = EpsDenoiser(net, AC, quantize=False)
    fractional(torch.zeros(1, 3), between[None])
    assert float(seen[-1][0]) == pytest.approx(41.7, abs=1e-4)
    assert denoiser.sigma_min == pytest.approx(float(grid[0])) and denoiser.sigma_max == pytest.approx(float(grid[-1]))
    torch.testing.assert_close(denoiser.t_to_sigma(denoiser.sigma_to_t(grid[[3, 900]])), grid[[3, 900]].float(),
                               check_dtype=False)


def test_preconditioning_feeds_the_vp_input_and_combines_output():
    sigma = torch.tensor([2.0], dtype=torch.float64)
    x = torch.full((1, 4), 5.0, dtype=torch.float64)
    received = []
    net = lambda x_in, t, cond: received.append(x_in) or torch.ones_like(x_in)
    for name, (c_skip, c_out) in {"eps": (1.0, -2.0), "v": (0.2, -2 / 5**0.5), "x0": (0.0, 1.0)}.items():
        out = make_denoiser(net, AC, name)(x, sigma)
        torch.testing.assert_close(received[-1], x / 5**0.5)  # c_in = 1/sqrt(1 + sigma^2)
        torch.testing.assert_close(out, c_skip * x + c_out * torch.ones_like(x))
    for name in ("eps", "v", "x0"):
        c_skip, c_out, c_in = scalings(name, sigma)
        assert float(c_in) == pytest.approx(5**-0.5)


@pytest.mark.parametrize("name", ["eps", "v", "x0"])
def test_network_outputting_the_training_target_recovers_x0(name):
    x0, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    a = AC[t]
    x_t = a.sqrt()[:, None, None, None] * x0 + (1 - a).sqrt()[:, None, None, None] * noise
    target = prediction_target(name, x0, noise, a)
    net = lambda x_in, tt, cond: (torch.testing.assert_close(x_in, x_t), target)[1]
    sigma = alpha_bar_to_sigma(a)
    torch.testing.assert_close(make_denoiser(net, AC, name)(x0 + sigma[:, None, None, None] * noise, sigma), x0)


def test_v_target_formula_and_bad_names():
    x0, noise, a = torch.ones(1, 2), torch.full((1, 2), 2.0), torch.tensor([0.36])
    torch.testing.assert_close(prediction_target("v", x0, noise, a), torch.full((1, 2), 0.6 * 2 - 0.8))
    with pytest.raises(ValueError, match="unknown parameterization 'flow'; use one of eps, v, x0"):
        DiscreteDenoiser(lambda *a: None, AC, "flow")
    with pytest.raises(ValueError, match="pass one sigma per item"):
        EpsDenoiser(lambda x, t, c: x, AC)(torch.zeros(3, 1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- guidance


class CountingDenoiser:
    """D(x, sigma, cond) = x * 0.5 + cond-dependent shift, recording the batch sizes it sees."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond=None):
        self.batches.append(x.shape[0])
        c = cond["crossattn"] + cond["vector"] if isinstance(cond, dict) else cond
        return 0.5 * x + c.mean(dim=tuple(range(1, c.ndim))).reshape(-1, 1) * sigma[:, None]


def test_cfg_scale_one_equals_cond_model_and_skips_uncond():
    inner = CountingDenoiser()
    x, sigma, cond = torch.randn(3, 4), torch.rand(3) + 0.5, torch.randn(3, 2, 5)
    out = CFGDenoiser(inner, 1.0, uncond=torch.zeros(3, 2, 5))(x, sigma, cond)
    torch.testing.assert_close(out, CountingDenoiser()(x, sigma, cond))
    assert inner.batches == [3]


def test_cfg_is_one_batched_forward_with_tensor_and_dict_cond():
    x, sigma = torch.randn(2, 4), torch.rand(2) + 0.5
    cond = {"crossattn": torch.randn(2, 3, 5), "vector": torch.randn(2, 3, 5)}
    uncond = {"crossattn": torch.randn(1, 3, 5), "vector": torch.zeros(1, 3, 5)}  # batch 1 is broadcast
    inner = CountingDenoiser()
    out = CFGDenoiser(inner, 7.5, uncond)(x, sigma, cond)
    assert inner.batches == [4]
    ref = CountingDenoiser()
    u = ref(x, sigma, {k: v.expand(2, 3, 5) for k, v in uncond.items()})
    c = ref(x, sigma, cond)
    torch.testing.assert_close(out, u + 7.5 * (c - u))
    tensor_out = CFGDenoiser(CountingDenoiser(), 3.0, uncond["crossattn"])(x, sigma, cond["crossattn"])
    u, c = ref(x, sigma, uncond["crossattn"].expand(2, 3, 5)), ref(x, sigma, cond["crossattn"])
    torch.testing.assert_close(tensor_out, u + 3.0 * (c - u))


def test_cfg_errors_are_clear():
    x, sigma = torch.randn(2, 4), torch.ones(2)
    keys_error = r"uncond keys \['crossattn'\] differ from cond keys \['concat', 'crossattn'\]"
    with pytest.raises(ValueError, match=keys_error):
        CFGDenoiser(CountingDenoiser(), 2.0, {"crossattn": torch.zeros(2, 1)})(
            x, sigma, {"crossattn": torch.zeros(2, 1), "concat": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="uncond has batch 3 but x has batch 2"):
        CFGDenoiser(CountingDenoiser(), 2.0, torch.zeros(3, 1))(x, sigma, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"guidance rescale 1.5 is outside \[0, 1\]"):
        CFGDenoiser(CountingDenoiser(), 2.0, None, rescale=1.5)


def test_guidance_rescale_matches_cond_std():
    x, sigma = torch.randn(2, 16), torch.ones(2)
    cond, uncond = torch.randn(2, 1) * 3, torch.randn(2, 1)
    noisy = lambda x, s, c: x * c  # output std depends on the conditioning
    full = CFGDenoiser(noisy, 5.0, uncond, rescale=1.0)(x, sigma, cond)
    torch.testing.assert_close(full.std(dim=1), (x * cond).std(dim=1))
    plain = CFGDenoiser(noisy, 5.0, uncond)(x, sigma, cond)
    half = CFGDenoiser(noisy, 5.0, uncond, rescale=0.5)(x, sigma, cond)
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * full)
    torch.testing.assert_close(rescale_guidance(plain, plain, 1.0), plain)


# ---------------------------------------------------------------------------------------------- inpainting


def test_inpaint_denoiser_keeps_the_unmasked_region():
    data = GaussianData(0.5, 0.8)
    init = torch.full((2, 3, 4, 4), -2.0)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2, :] = 1  # repaint the top half
    noise = SM.randn_like(init, [torch.Generator().manual_seed(s) for s in (1, 2)])
    denoiser = InpaintDenoiser(data.denoise, init, mask, noise)
    sigmas = SM.build_sigmas("DPM++ 2M", AC, 10)
    out = SM.sample("DPM++ 2M", denoiser, torch.randn(2, 3, 4, 4), sigmas)
    torch.testing.assert_close(out[..., 2:, :], init[..., 2:, :])
    assert float(out[..., :2, :].mean()) > -1.0  # repainted towards the data mean 0.5
    # the model saw the known region noised to the current sigma
    seen = []
    spy = InpaintDenoiser(lambda x, s, c=None: seen.append(x) or x, init, mask, noise)
    spy(torch.zeros_like(init), torch.full((2,), 3.0))
    torch.testing.assert_close(seen[0][..., 2:, :], (init + 3.0 * noise)[..., 2:, :])
    torch.testing.assert_close(seen[0][..., :2, :], torch.zeros(2, 3, 2, 4))


def test_inpaint_denoiser_checks_noise_shape():
    mask, masked = torch.ones(2, 1, 4, 4), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="noise shape"):
        InpaintDenoiser(lambda *a: None, masked, mask, torch.zeros(1, 4, 4, 4))
