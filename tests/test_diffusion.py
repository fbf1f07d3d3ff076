"""Oracle tests for shd_diffusion.diffusion: closed forms, independent KL/NLL, diffusers parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from shd_diffusion.diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    space_timesteps,
)
from shd_diffusion.diffusion.sampling import add_step_noise

pytestmark = pytest.mark.numerics  # rerun on every CPU vector path (test_vector_paths)

T = 1000


@pytest.fixture(scope="module")
def base() -> GaussianDiffusion:
    return create_diffusion(None)


def _loop_alphas_cumprod(betas: np.ndarray) -> list[float]:
    """abar_t by an explicit running product (independent of np.cumprod)."""
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - float(b)
        out.append(prod)
    return out


def _fake_model(x: torch.Tensor, t_model: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic per-sample stand-in for a learn_sigma network: (B, C, H, W) -> (B, 2C, H, W)."""
    tt = (t_model.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    eps = torch.tanh(0.8 * x + tt)
    v = torch.sin(x + 3.0 * tt)
    if label is not None:
        eps = eps + 0.01 * label.to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([eps, v], dim=1)  # (B, 2C, H, W)


# --------------------------------------------------------------------------------------------
# Schedule tables
# --------------------------------------------------------------------------------------------


def test_linear_betas_endpoints() -> None:
    betas = linear_beta_schedule(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    # ADM rescales for other step counts: 4000 steps -> endpoints / 4.
    betas_4k = linear_beta_schedule(4000)
    assert betas_4k[0] == pytest.approx(2.5e-5) and betas_4k[-1] == pytest.approx(0.005)


def test_tables_match_closed_forms(base: GaussianDiffusion) -> None:
    betas = linear_beta_schedule(T)
    abar = _loop_alphas_cumprod(betas)
    np.testing.assert_allclose(base.alphas_cumprod, abar, rtol=1e-13, atol=0)
    for t in [1, 2, 10, 500, 998, 999]:
        b, a_t, a_prev = float(betas[t]), abar[t], abar[t - 1]
        post_var = b * (1.0 - a_prev) / (1.0 - a_t)
        assert base.posterior_variance[t] == pytest.approx(post_var, rel=1e-12)
        assert base.posterior_log_variance_clipped[t] == pytest.approx(math.log(post_var), rel=1e-12)
        assert base.posterior_mean_coef1[t] == pytest.approx(b * math.sqrt(a_prev) / (1.0 - a_t), rel=1e-12)
        coef2 = (1.0 - a_prev) * math.sqrt(1.0 - b) / (1.0 - a_t)
        assert base.posterior_mean_coef2[t] == pytest.approx(coef2, rel=1e-12)
    # t = 0: the posterior is a point mass (variance 0, x_0 coefficient 1); the log is clipped to t = 1's.
    assert base.posterior_variance[0] == 0.0
    assert base.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert base.posterior_mean_coef2[0] == 0.0
    assert base.posterior_log_variance_clipped[0] == base.posterior_log_variance_clipped[1]


def test_q_sample_statistics(base: GaussianDiffusion) -> None:
    n, x0 = 200_000, 0.7
    gen = torch.Generator().manual_seed(0)
    for t in [0, 250, 999]:
        noise = torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
        xt = base.q_sample(torch.full((n, 1, 1, 1), x0, dtype=torch.float64), torch.full((n,), t), noise)
        abar = base.alphas_cumprod[t]
        mean_se = math.sqrt((1 - abar) / n)
        assert abs(xt.mean().item() - math.sqrt(abar) * x0) < 5 * mean_se + 1e-12
        # Var of the sample variance of a Gaussian is ~ 2 sigma^4 / n.
        assert abs(xt.var().item() - (1 - abar)) < 5 * math.sqrt(2.0 / n) * (1 - abar) + 1e-12


# --------------------------------------------------------------------------------------------
# Respacing
# --------------------------------------------------------------------------------------------


def test_space_timesteps_hand_examples() -> None:
    # 10 steps in 2 sections of 5: stride 4 in the first, 2 in the second.
    assert space_timesteps(10, "2,3") == {0, 4, 5, 7, 9}
    assert space_timesteps(10, [2, 3]) == {0, 4, 5, 7, 9}
    assert space_timesteps(100, "ddim5") == {0, 20, 40, 60, 80}
    assert space_timesteps(10, "ddim3") == {0, 4, 8}  # first stride with ceil(10 / s) == 3
    assert space_timesteps(1000, "1000") == set(range(1000))
    # 1000 split into 334 + 333 + 333 (the first section takes the remainder).
    kept = sorted(space_timesteps(1000, "10,15,20"))
    assert len(kept) == 45
    assert kept[:10] == [0, 37, 74, 111, 148, 185, 222, 259, 296, 333]
    assert kept[10] == 334 and kept[24] == 666 and kept[25] == 667 and kept[-1] == 999


def test_space_250_matches_diffusers_linspace() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    sched.set_timesteps(250)
    ours = sorted(space_timesteps(T, "250"), reverse=True)
    assert ours == sched.timesteps.tolist()
    assert ours[0] == 999 and ours[-1] == 0 and ours[-2] == 4
    # ADM's 50 / 100 step respacings agree with linspace as well.
    for n in (50, 100):
        sched.set_timesteps(n)
        assert sorted(space_timesteps(T, str(n)), reverse=True) == sched.timesteps.tolist()


@pytest.mark.parametrize(
    "spec",
    ["1001", "0", "-5", "", "abc", "10,,20", "ddim", "ddimx", "ddim0", "ddim1001", "ddim7", "400,400,400"],
)
def test_space_timesteps_rejects(spec: str) -> None:
    n = 10 if spec == "ddim7" else T  # no stride of 10 steps gives exactly 7
    with pytest.raises(ValueError):
        space_timesteps(n, spec)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,15,20"])
def test_respaced_betas_reproduce_alphas_cumprod(base: GaussianDiffusion, spec: str) -> None:
    diff = create_diffusion(spec)
    kept = sorted(space_timesteps(T, spec))
    assert diff.timestep_map.tolist() == kept
    assert diff.num_timesteps == len(kept)
    np.testing.assert_allclose(diff.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _independent_model_params(
    diff: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model mean / log-variance from scratch (float64, from betas and running products)."""
    betas = torch.tensor(diff.betas)
    abar = torch.tensor(_loop_alphas_cumprod(diff.betas), dtype=torch.float64)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_var_clipped = torch.cat([post_var[1:2], post_var[1:]])
    sh = (-1, 1, 1, 1)
    a, ap, b = abar[t].view(sh), abar_prev[t].view(sh), betas[t].view(sh)
    x0 = (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    mean = b * torch.sqrt(ap) / (1 - a) * x0 + (1 - ap) * torch.sqrt(1 - b) / (1 - a) * x_t
    frac = (v + 1) / 2
    log_var = frac * torch.log(b) + (1 - frac) * torch.log(post_var_clipped[t].view(sh))
    return mean, log_var


@pytest.mark.parametrize("spec", [None, "250"])
def test_vb_kl_matches_torch_distributions(spec: str | None) -> None:
    base = create_diffusion(spec)  # "250": respaced tables and the hybrid-loss scale 250 / 1000
    gen = torch.Generator().manual_seed(1)
    b, c = 5, 4
    x0 = torch.randn(b, c, 3, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 7, 100, base.num_timesteps // 2 + 3, base.num_timesteps - 1])
    x_t = base.q_sample(x0, t, noise)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1
    losses = base.training_losses(torch.cat([eps, v], 1), x0, x_t, t, noise)

    model_mean, model_log_var = _independent_model_params(base, x_t, t, eps, v)
    abar = torch.tensor(base.alphas_cumprod)
    ab_prev = torch.tensor(base.alphas_cumprod_prev)
    betas = torch.tensor(base.betas)
    sh = (-1, 1, 1, 1)
    true_mean = (betas[t] * ab_prev[t].sqrt() / (1 - abar[t])).view(sh) * x0 + (
        (1 - ab_prev[t]) * (1 - betas[t]).sqrt() / (1 - abar[t])
    ).view(sh) * x_t
    true_std = (betas[t] * (1 - ab_prev[t]) / (1 - abar[t])).sqrt().view(sh).expand_as(x0)
    kl = kl_divergence(Normal(true_mean, true_std), Normal(model_mean, torch.exp(0.5 * model_log_var)))
    expected_vb = kl.mean(dim=(1, 2, 3)) / math.log(2.0) * (base.num_timesteps / 1000)
    torch.testing.assert_close(losses["vb"], expected_vb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def _phi_approx(z: float) -> float:
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def test_discretized_ll_tiny_example_by_hand() -> None:
    x = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64)
    mu = torch.tensor([-0.99, 0.205, 0.995], dtype=torch.float64)
    sigma = 0.01
    got = discretized_gaussian_log_likelihood(x, mu, torch.full_like(x, math.log(sigma)))
    h = 1 / 255
    # x = -1 owns (-inf, -1 + h]; x = 1 owns [1 - h, inf); interior values own [x - h, x + h].
    hand = [
        math.log(_phi_approx((-1 + h + 0.99) / sigma)),
        math.log(_phi_approx((0.2 + h - 0.205) / sigma) - _phi_approx((0.2 - h - 0.205) / sigma)),
        math.log(1 - _phi_approx((1 - h - 0.995) / sigma)),
    ]
    torch.testing.assert_close(got, torch.tensor(hand, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # The tanh CDF approximation stays close to the exact one.
    z = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max() < 2e-4


def test_vb_at_t0_is_decoder_nll_by_hand(base: GaussianDiffusion) -> None:
    # One sample, 2 channels (1 eps + 1 v) on a 1x3 image of 8-bit values; t = 0.
    x0 = torch.tensor([[[[-1.0, 2 * 140 / 255 - 1, 1.0]]]], dtype=torch.float64)  # (1, 1, 1, 3)
    x_t = x0 + 0.004 * torch.tensor([[[[1.0, -1.0, 0.5]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.3, -0.2, 0.1]]]], dtype=torch.float64)
    v = torch.tensor([[[[0.5, -0.5, 0.0]]]], dtype=torch.float64)
    t = torch.zeros(1, dtype=torch.long)
    vb = base.training_losses(torch.cat([eps, v], 1), x0, x_t, t, torch.zeros_like(x0))["vb"]

    b0, b1 = base.betas[0], base.betas[1]
    post_var_1 = b1 * (1 - base.alphas_cumprod[0]) / (1 - base.alphas_cumprod[1])
    h, nll = 1 / 255, 0.0
    for j in range(3):
        xs, xt_j, e, vv = (float(a[0, 0, 0, j]) for a in (x0, x_t, eps, v))
        # At t = 0 the posterior mean is the predicted x_0 itself.
        mu = (xt_j - math.sqrt(1 - (1 - b0)) * e) / math.sqrt(1 - b0)
        frac = (vv + 1) / 2
        sigma = math.exp(0.5 * (frac * math.log(b0) + (1 - frac) * math.log(post_var_1)))
        if j == 0:
            p = _phi_approx((xs + h - mu) / sigma)
        elif j == 2:
            p = 1 - _phi_approx((xs - h - mu) / sigma)
        else:
            p = _phi_approx((xs + h - mu) / sigma) - _phi_approx((xs - h - mu) / sigma)
        nll -= math.log(max(p, 1e-12))
    expected = nll / 3 / math.log(2.0) * (T / 1000)
    assert vb.item() == pytest.approx(expected, rel=1e-9)


def test_vb_stop_gradient_trains_only_variance(base: GaussianDiffusion) -> None:
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 4, 4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 10, 900])  # covers both the decoder NLL and the KL branch
    x_t = base.q_sample(x0, t, noise)
    out = torch.randn(3, 8, 4, 4, generator=gen).requires_grad_(True)
    losses = base.training_losses(out, x0, x_t, t, noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert torch.all(grad_vb[:, :4] == 0)
    assert torch.all(grad_vb[:, 4:].abs().flatten(1).sum(1) > 0)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.all(grad_mse[:, 4:] == 0) and torch.all(grad_mse[:, :4].abs().flatten(1).sum(1) > 0)


def test_min_snr_weight_by_hand(base: GaussianDiffusion) -> None:
    t = torch.tensor([0, 50, 200, 999])
    w = base.min_snr_weight(t, gamma=5.0)
    abar = _loop_alphas_cumprod(linear_beta_schedule(T))
    for i, ti in enumerate(t.tolist()):
        snr = abar[ti] / (1 - abar[ti])
        assert w[i].item() == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    # Low-noise steps (SNR >> 5) are down-weighted, high-noise ones (SNR < 5) keep weight 1.
    assert w[0].item() < 1e-3 and w[-1].item() == 1.0
    # mse_weight multiplies the MSE term only.
    x0 = torch.randn(4, 2, 2, 2)
    noise = torch.randn_like(x0)
    x_t = base.q_sample(x0, t, noise)
    out = torch.randn(4, 4, 2, 2)
    plain = base.training_losses(out, x0, x_t, t, noise)
    weighted = base.training_losses(out, x0, x_t, t, noise, mse_weight=w)
    torch.testing.assert_close(weighted["mse"], plain["mse"] * w)
    torch.testing.assert_close(weighted["vb"], plain["vb"])


def test_fixed_variance_without_learn_sigma() -> None:
    diff = create_diffusion(None, learn_sigma=False)
    x0, noise = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    t = torch.tensor([0, 5])
    losses = diff.training_losses(torch.randn(2, 3, 2, 2), x0, diff.q_sample(x0, t, noise), t, noise)
    assert set(losses) == {"mse", "loss"}
    out = diff.p_mean_variance(torch.randn(2, 3, 2, 2), x0, t)
    # ADM fixed-large: beta_t, with t = 0 using the posterior variance of t = 1.
    assert out["variance"][1].item() == pytest.approx(diff.betas[5], rel=1e-6)
    assert out["variance"][0].item() == pytest.approx(diff.posterior_variance[1], rel=1e-6)
    with pytest.raises(ValueError, match="learn_sigma"):
        diff.p_mean_variance(torch.randn(2, 6, 2, 2), x0, t)
    with pytest.raises(ValueError, match="learn_sigma"):
        create_diffusion(None).p_mean_variance(torch.randn(2, 3, 2, 2), x0, t)


# --------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------


def test_alphas_cumprod_matches_diffusers(base: GaussianDiffusion) -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range", clip_sample=False
    )
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), base.alphas_cumprod, rtol=2e-5, atol=0)


def _ddpm_scheduler(n_steps: int, float64_tables: bool):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    sched.set_timesteps(n_steps)
    if float64_tables:
        # Same formulas, ADM's float64 schedule: isolates definition differences from precision.
        sched.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - linear_beta_schedule(T)))
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("float64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("spec,n_steps", [("250", 250), (None, 1000)], ids=["respaced250", "full1000"])
def test_reverse_step_matches_diffusers(spec: str | None, n_steps: int, float64: bool) -> None:
    """One learned-range reverse step equals DDPMScheduler.step for the same model output and noise.

    Timestep conventions: diffusers' step takes the *original* timestep (``scheduler.timesteps``);
    ours takes the index into the respaced diffusion, and ``timestep_map[index]`` is that original
    timestep (checked via what the model sees). Neither adds noise at the last step (t = 0).

    With float64 tables the two agree to rounding. Stock diffusers keeps float32 tables and forms
    beta_t = 1 - abar_t / abar_prev in float32, which cancels badly for the small betas of early
    steps (relative error ~1e-3 on beta_1): its step then differs by up to ~2e-4 absolute on
    O(1) samples, while our float32 path stays within ~3e-7 of float64.
    """
    sched = _ddpm_scheduler(n_steps, float64)
    diff = create_diffusion(spec)
    dtype = torch.float64 if float64 else torch.float32
    gen = torch.Generator().manual_seed(4)
    for index in [diff.num_timesteps - 1, diff.num_timesteps // 2, 3, 1, 0]:
        t_orig = int(diff.timestep_map[index])
        x = torch.randn(1, 4, 4, 4, generator=gen, dtype=dtype)
        eps = torch.randn(1, 4, 4, 4, generator=gen, dtype=dtype)
        v = torch.rand(1, 4, 4, 4, generator=gen, dtype=dtype) * 2 - 1
        model_out = torch.cat([eps, v], 1)  # (1, 8, 4, 4)
        ref = sched.step(model_out, t_orig, x, generator=torch.Generator().manual_seed(index))
        seen: list[int] = []

        def model_fn(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            seen.append(int(tt[0]))
            return model_out

        # B = 1: our per-sample draw and diffusers' batch draw take the same values from one seed.
        ours = diff.p_sample_step(model_fn, x, index, generators=[torch.Generator().manual_seed(index)])
        assert seen == [t_orig]
        # pred_x0 grows like 1 / sqrt(abar) (~156 at t = 999): compare relative to its scale.
        scale = max(ref.pred_original_sample.abs().max().item(), 1.0)
        tol_x0, tol_sample = (1e-12 * scale, 1e-12) if float64 else (2e-5 * scale, 3e-4)
        torch.testing.assert_close(ours["pred_xstart"], ref.pred_original_sample, rtol=0, atol=tol_x0)
        torch.testing.assert_close(ours["sample"], ref.prev_sample, rtol=0, atol=tol_sample)


def test_ddim_matches_diffusers() -> None:
    """A full eta = 0 DDIM trajectory ("ddim50" = diffusers' leading spacing, stride 20)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    sched.set_timesteps(50)
    diff = create_diffusion("ddim50")
    assert sorted(diff.timestep_map.tolist(), reverse=True) == sched.timesteps.tolist()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    ours = diff.ddim_sample_loop(_fake_model, x_T)
    x = x_T
    for t in sched.timesteps:
        eps = _fake_model(x, t.expand(2))[:, :4]
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    # The stand-in model is no denoiser, so x_0 ends up O(100): compare relatively.
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Sampling loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_sampling_batch_equals_per_sample(sampler: str) -> None:
    """With one generator per sample, a sample does not depend on the batch it is drawn in."""
    diff = create_diffusion("20")

    def run(x_T: torch.Tensor, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        if sampler == "ddpm":
            return diff.p_sample_loop(_fake_model, x_T, {"label": labels}, generators=gens)
        return diff.ddim_sample_loop(_fake_model, x_T, {"label": labels}, generators=gens, eta=1.0)

    x_T = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    batch = run(x_T, labels, seeds)
    for i, s in enumerate(seeds):
        single = run(x_T[i : i + 1], labels[i : i + 1], [s])
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-6)
    # The generators really drive the noise: another seed changes the sample.
    other = run(x_T[:1], labels[:1], [99])
    assert (other - batch[:1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one torch.Generator per sample"):
        diff.p_sample_loop(_fake_model, x_T, {"label": labels}, generators=[torch.Generator()])


def test_respaced_sampling_uses_original_timesteps() -> None:
    diff = create_diffusion("250")
    seen: list[int] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return _fake_model(x, t)

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    diff.p_sample_loop(model_fn, torch.randn(2, 1, 2, 2), generators=gens)
    assert len(seen) == 250 and seen[0] == 999 and seen[1] == 995 and seen[-1] == 0
    assert seen == sorted(space_timesteps(T, "250"), reverse=True)


def test_last_step_adds_no_noise(base: GaussianDiffusion) -> None:
    x = torch.randn(2, 2, 2, 2)
    a = base.p_sample_step(_fake_model, x, 0, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    b = base.p_sample_step(_fake_model, x, 0, generators=[torch.Generator().manual_seed(s) for s in (3, 4)])
    t0 = torch.zeros(2, dtype=torch.long)
    mean = base.p_mean_variance(_fake_model(x, t0), x, t0)["mean"]
    torch.testing.assert_close(a["sample"], mean, rtol=0, atol=0)
    torch.testing.assert_close(b["sample"], mean, rtol=0, atol=0)


def test_step_noise_tail_masks_t0_rows_and_draws_per_sample() -> None:
    """The one noise tail of DDPM and DDIM: rows at t = 0 stay, others get std * their own draw."""
    sample = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    std = torch.tensor([0.5, 2.0, 3.0]).view(3, 1, 1, 1)  # (B, 1, 1, 1)
    t = torch.tensor([4, 0, 7])
    out = add_step_noise(sample, t, std, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for i, seed in ((0, 1), (2, 3)):
        draw = torch.randn(2, 2, 2, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out[i], sample[i] + std[i] * draw, rtol=0, atol=1e-7)
    assert torch.equal(out[1], sample[1])
    # Every row at t = 0: no draw at all (the generators' streams are left where they were).
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    assert add_step_noise(sample, torch.zeros(3, dtype=torch.long), std, gens) is sample
    assert all(torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state()) for g in gens)
    # Given noise is used as is.
    noise = torch.ones_like(sample)
    torch.testing.assert_close(add_step_noise(sample, t, std, None, noise)[0], sample[0] + 0.5, rtol=0, atol=1e-7)
