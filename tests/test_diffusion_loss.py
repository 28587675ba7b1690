"""DiffusionLoss: x_t construction, targets, min-SNR weights, offset noise, errors."""

import pytest
import torch

from ldm.diffusion.loss import DiffusionLoss, min_snr_weight
from test_diffusion_analytic import sd_alphas_cumprod

AC = sd_alphas_cumprod(torch.float32)


def oracle_net(x0, alphas_cumprod, parameterization):
    """A network that knows x0 and so outputs the exact target for any x_t."""

    def net(x_t, t, cond):
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]

    return net


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_perfect_network_has_zero_loss(parameterization, weighting):
    x0 = torch.randn(4, 2, 4, 4)
    loss_fn = DiffusionLoss(parameterization, weighting=weighting, offset_noise=0.1)
    loss, logs = loss_fn(oracle_net(x0, AC, parameterization), x0, None, AC, generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8 and set(logs) == {"loss", "mse"}


def test_net_sees_x_t_and_t_and_cond_and_targets_are_right():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    a = AC[t].reshape(-1, 1, 1, 1)
    seen = {}

    def zero_net(x_t, tt, cond):
        seen.update(x_t=x_t, t=tt, cond=cond)
        return torch.zeros_like(x_t)

    for name, target in {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}.items():
        loss, logs = DiffusionLoss(name)(zero_net, x0, {"crossattn": 1}, AC, t=t, noise=noise)
        torch.testing.assert_close(seen["x_t"], a.sqrt() * x0 + (1 - a).sqrt() * noise)
        assert seen["t"].tolist() == [0, 500, 999] and seen["cond"] == {"crossattn": 1}
        torch.testing.assert_close(loss, (target**2).mean())
        torch.testing.assert_close(logs["mse"], (target**2).mean())


def test_min_snr_weights_per_parameterization():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight("eps", snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight("v", snr, 5.0), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(min_snr_weight("x0", snr, 5.0), torch.tensor([0.0, 0.5, 5.0, 5.0]))
    # the weighted loss is sum(w * mse) / B
    x0, noise, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([10, 900])
    zero_net = lambda x_t, tt, cond: torch.zeros_like(x_t)
    loss, logs = DiffusionLoss("eps", weighting="min_snr", min_snr_gamma=5.0)(zero_net, x0, None, AC, t=t, noise=noise)
    snr_t = AC[t] / (1 - AC[t])
    expected = (torch.minimum(snr_t, torch.tensor(5.0)) / snr_t * (noise**2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)


def test_offset_noise_adds_a_per_channel_constant():
    x0 = torch.zeros(512, 3, 8, 8)
    plain = DiffusionLoss().sample_noise(x0, torch.Generator().manual_seed(0))
    offset = DiffusionLoss(offset_noise=0.5).sample_noise(x0, torch.Generator().manual_seed(0))
    channel_means = offset.mean(dim=(2, 3))
    # var of a channel mean: 1/64 from the white noise, plus 0.25 from the offset
    assert float(channel_means.var()) == pytest.approx(1 / 64 + 0.25, rel=0.1)
    assert float(plain.mean(dim=(2, 3)).var()) == pytest.approx(1 / 64, rel=0.1)


def test_timesteps_are_uniform_over_the_schedule():
    seen = []
    net = lambda x_t, t, cond: seen.append(t) or torch.zeros_like(x_t)
    loss_fn = DiffusionLoss(num_timesteps=10)
    ac = torch.linspace(0.99, 0.01, 10)
    for _ in range(50):
        loss_fn(net, torch.zeros(40, 1, 1, 1), None, ac)
    counts = torch.bincount(torch.cat(seen), minlength=10)
    assert len(counts) == 10 and int(counts.min()) > 120  # 200 expected per bin


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown parameterization 'noise'"):
        DiffusionLoss("noise")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'; use one of uniform, min_snr"):
        DiffusionLoss(weighting="snr")
    with pytest.raises(ValueError, match="alphas_cumprod has 1000 entries but num_timesteps=500"):
        DiffusionLoss(num_timesteps=500)(lambda *a: None, torch.zeros(1, 1), None, AC)


@pytest.mark.parametrize("bias, favoured", [
    ({"strategy": "later", "multiplier": 3.0, "portion": 0.2}, slice(8, 10)),  # the noisiest fifth, 3x as often
    ({"strategy": "earlier", "multiplier": 3.0, "portion": 0.2}, slice(0, 2)),
    ({"strategy": "range", "multiplier": 3.0, "begin": 4, "end": 6}, slice(4, 6)),
])
def test_timestep_bias_draws_the_chosen_timesteps_more_often(bias, favoured):
    seen = []
    net = lambda x_t, t, cond: seen.append(t) or torch.zeros_like(x_t)
    loss_fn = DiffusionLoss(num_timesteps=10, timestep_bias=bias)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss_fn(net, torch.zeros(60, 1, 1, 1), None, torch.linspace(0.99, 0.01, 10), generator=gen)
    counts = torch.bincount(torch.cat(seen), minlength=10).double()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[favoured] = True
    # 6000 draws, weights 3 on 2 bins and 1 on 8: 1286 expected per favoured bin, 429 per other
    assert len(counts) == 10 and int(counts[mask].min()) > 1150 and int(counts[~mask].max()) < 520
    assert abs(counts[mask].mean() / counts[~mask].mean() - 3.0) < 0.25


def test_no_timestep_bias_keeps_the_uniform_draws():
    """strategy none (or no bias) draws exactly what an unbiased loss draws: runs without it are unchanged."""
    draws = []
    for bias in (None, {"strategy": "none"}):
        gen = torch.Generator().manual_seed(3)
        draws.append(DiffusionLoss(timestep_bias=bias).sample_timesteps(64, "cpu", gen))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bias, message", [
    ("later", "timestep_bias must be a mapping"),
    ({"strategy": "late"}, r"timestep_bias.strategy 'late' is not one of none, later, earlier, range"),
    ({"multiplier": 0}, "timestep_bias.multiplier must be a number > 0"),
    ({"portion": 1.5}, r"timestep_bias.portion must be in \(0, 1\]"),
    ({"strategy": "range", "begin": 900, "end": 100}, "begin and end must be integers with 0 <= begin < end <= 1000"),
    ({"strategy": "later", "begin": 10}, "begin / end are for strategy range"),
    ({"portoin": 0.5}, r"unknown key\(s\) \['portoin'\]"),
])
def test_bad_timestep_bias_names_the_key(bias, message):
    with pytest.raises(ValueError, match=message):
        DiffusionLoss(timestep_bias=bias)
