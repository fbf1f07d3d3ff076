"""Rectified flow (shd_diffusion.diffusion.flow): analytic oracles, per-sample draws, bad configs."""

import math

import pytest
import torch

from shd_diffusion.diffusion import flow
from shd_diffusion.diffusion.flow import FlowConfig
from shd_diffusion.seeding import seeded_generator


def gens_for(ids: list[int], key: str = "flow-test") -> list[torch.Generator]:
    """One generator per sample, keyed by the sample's id (not its position in the batch)."""
    return [seeded_generator(key, i) for i in ids]


def pair(shape=(3, 2, 4, 4), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_path_endpoints_and_target():
    x0, noise = pair()
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(3, dtype=torch.float64)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(3, dtype=torch.float64)), noise)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    x_t = flow.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * noise[1], rtol=0, atol=1e-15)
    # The target is the derivative of the path: a finite difference of the (linear) path equals it.
    dt = 1e-3
    fd = (flow.interpolate(x0, noise, t + dt) - flow.interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(fd, flow.velocity_target(x0, noise), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shift", [1.0, 3.0, math.exp(flow.flux_mu(1024))])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
def test_euler_with_the_true_velocity_reaches_x0(num_steps, shift):
    x0, noise = pair()
    seen: list[float] = []

    def true_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (x - x0) / t is the velocity only at the right x and t, so a wrong t or step breaks it.
        assert t.shape == (3,) and t.dtype == torch.float64
        seen.append(t[0].item())
        return (x - x0) / t.view(-1, 1, 1, 1)

    out = flow.euler_sample(true_velocity, noise, num_steps, shift=shift)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    want = flow.shift_timesteps(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)[:-1]
    assert seen == want.tolist() and seen[0] == 1.0


def test_guidance_is_a_callable_the_caller_builds():
    x0, noise = pair()
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.guided_velocity(v, torch.zeros_like(v), 1.0), v)
    got = flow.guided_velocity(torch.tensor([3.0]), torch.tensor([1.0]), 4.0)
    assert got.item() == 1.0 + 4.0 * (3.0 - 1.0)

    def cfg_velocity(x, t):  # cond = true velocity, uncond = 0: scale 1 must still land on x0
        cond = (x - x0) / t.view(-1, 1, 1, 1)
        return flow.guided_velocity(cond, torch.zeros_like(cond), 1.0)

    torch.testing.assert_close(flow.euler_sample(cfg_velocity, noise, 5), x0, rtol=0, atol=1e-12)


def test_shift_formula_and_flux_mu():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        assert flow.shift_timesteps(t, s).tolist() == [0.0, s / (1 + s), 1.0]
    assert flow.flux_mu(256) == 0.5 and flow.flux_mu(4096) == pytest.approx(1.15, abs=1e-15)
    assert FlowConfig(mu=0.5).effective_shift == math.exp(0.5)
    grid = flow.sampling_timesteps(4, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid.diff() < 0).all()


@pytest.mark.parametrize("shift, mu", [(1.0, None), (3.0, None), (1.0, 0.8)])
def test_logit_normal_moments(shift, mu):
    # logit of the shifted time is logit(t) + log(s) (s = exp(mu) for FLUX): the moments are known exactly.
    n, mean, std = 20_000, 0.3, 1.2
    cfg = FlowConfig(logit_mean=mean, logit_std=std, shift=shift, mu=mu)
    shift = cfg.effective_shift
    t = flow.sample_timesteps(cfg, gens_for(list(range(n))))
    logit = torch.log(t) - torch.log1p(-t)
    # 5 standard errors: sample mean's SE is std / sqrt(n), sample std's about std / sqrt(2 (n - 1)).
    assert abs(logit.mean().item() - (mean + math.log(shift))) < 5 * std / math.sqrt(n)
    assert abs(logit.std().item() - std) < 5 * std / math.sqrt(2 * (n - 1))


def test_uniform_draws():
    t = flow.sample_timesteps(FlowConfig(sampling="uniform"), gens_for(list(range(4000))))
    assert t.dtype == torch.float64 and 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 4000)  # U[0, 1) has variance 1/12


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_draws_do_not_depend_on_the_batch(sampling):
    cfg = FlowConfig(sampling=sampling, shift=3.0)
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t4, noise4, xt4 = flow.noised(cfg, x0, gens_for([10, 11, 12, 13]))
    for i in range(4):
        t1, noise1, xt1 = flow.noised(cfg, x0[i : i + 1], gens_for([10 + i]))
        assert torch.equal(t1, t4[i : i + 1]) and torch.equal(noise1, noise4[i : i + 1])
        assert torch.equal(xt1, xt4[i : i + 1])
    assert len(set(t4.tolist())) == 4  # the samples do get different draws


def test_losses_zero_for_perfect_predictor_and_hand_value():
    x0, noise = pair()
    terms = flow.training_losses(flow.velocity_target(x0, noise), x0, noise)
    assert terms["loss"].shape == (3,) and torch.equal(terms["loss"], torch.zeros(3, dtype=torch.float64))

    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # (B=2, 2)
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # targets: [-1, -2] and [1, 2]
    v_pred = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # sample 0: ((0+1)^2 + (0+2)^2) / 2 = 2.5; sample 1: (0^2 + (0-2)^2) / 2 = 2.0
    assert flow.training_losses(v_pred, x0, noise)["mse"].tolist() == [2.5, 2.0]
    assert flow.training_losses(v_pred, x0, noise, weight=torch.tensor([2.0, 0.5]))["loss"].tolist() == [5.0, 1.0]
    assert flow.velocity_kd(v_pred, torch.zeros(2, 2)).tolist() == [0.0, 0.5]


def test_kd_does_not_reach_the_teacher():
    student = torch.ones(2, 3, requires_grad=True)
    teacher = torch.zeros(2, 3, requires_grad=True)
    flow.velocity_kd(student, teacher).sum().backward()
    assert teacher.grad is None and torch.equal(student.grad, torch.full((2, 3), 2 / 3))


def test_model_timestep_scales():
    t = torch.tensor([0.0, 0.25, 1.0])
    assert flow.model_timestep(t, 1000.0).tolist() == [0.0, 250.0, 1000.0]  # SD3
    assert torch.equal(flow.model_timestep(t, 1.0), t)  # FLUX


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": "cosine"}, r"flow sampling 'cosine' is unknown: set sampling to one of logit_normal, uniform"),
        ({"logit_std": 0.0}, r"logit_std > 0"),
        ({"shift": -1.0}, r"flow shift -1.0 must be finite and > 0"),
        ({"shift": 3.0, "mu": 0.5}, r"give shift \(SD3\) or mu \(FLUX"),
        ({"mu": float("nan")}, r"flow mu nan must be finite"),
        ({"timestep_scale": 0.0}, r"timestep_scale 0.0 must be > 0"),
    ],
)
def test_bad_configs_raise_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowConfig(**kwargs)


def test_bad_calls_raise_clearly():
    x0, noise = pair()
    with pytest.raises(ValueError, match=r"2 generators for a batch of 3: give one generator per sample"):
        flow.noised(FlowConfig(), x0, gens_for([0, 1]))
    with pytest.raises(ValueError, match=r"t has shape \(2,\); expected \(3,\)"):
        flow.interpolate(x0, noise, torch.zeros(2))
    with pytest.raises(ValueError, match=r"velocity prediction vs x0"):
        flow.training_losses(x0[:, :1], x0, noise)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        flow.training_losses(x0, x0, noise, weight=torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"num_steps 0 must be >= 1"):
        flow.euler_sample(lambda x, t: x, noise, 0)
    with pytest.raises(ValueError, match=r"velocity vs x"):
        flow.euler_sample(lambda x, t: x[:1], noise, 2)
