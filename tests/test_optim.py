"""Optimizers, lr schedule and EMA (shd_diffusion.optim).

The Adan parity tests check both implementations against a float64 reference written here from
the Adan paper (Xie et al. 2022, Alg. 1) in the restart-free form of the official sail-sg/Adan
code: moments m (gradient), v (gradient difference, 0 at the first step), n (squared
``g + beta2 * diff``), per-moment bias corrections, then decoupled ``param / (1 + lr * wd)``.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from shd_diffusion.optim import EMA, build_optimizer, build_scheduler, warmup_lr_lambda

BETAS = (0.98, 0.92, 0.99)
LR, EPS, STEPS = 0.05, 1e-8, 20


# ----------------------------------------------------------------------------- toy problem

def _toy_problem() -> tuple[list[torch.Tensor], callable]:
    """Tiny float64 linear regression: initial (W, b) and a function params -> gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    w_true = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    y = x @ w_true.T + 0.5  # (16, 3)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]

    def grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
        w, b = (p.detach().requires_grad_(True) for p in params)
        loss = ((x @ w.T + b - y) ** 2).mean()
        return list(torch.autograd.grad(loss, (w, b)))

    return init, grads


def _reference_adan(init, grads_fn, steps, lr, betas, eps, wd) -> list[list[torch.Tensor]]:
    """Official Adan (restart-free, no_prox=False). Returns the parameters after every step."""
    b1, b2, b3 = betas
    theta = [p.clone() for p in init]
    m = [torch.zeros_like(p) for p in init]
    v = [torch.zeros_like(p) for p in init]
    n = [torch.zeros_like(p) for p in init]
    prev = None
    out = []
    for k in range(1, steps + 1):
        g = grads_fn(theta)
        diff = [torch.zeros_like(gi) for gi in g] if prev is None else [gi - pi for gi, pi in zip(g, prev)]
        bc1, bc2, bc3 = 1 - b1**k, 1 - b2**k, 1 - b3**k
        for i in range(len(theta)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * diff[i]
            n[i] = b3 * n[i] + (1 - b3) * (g[i] + b2 * diff[i]) ** 2
            step = (m[i] / bc1 + b2 * v[i] / bc2) / ((n[i] / bc3).sqrt() + eps)
            theta[i] = (theta[i] - lr * step) / (1 + lr * wd)
        prev = g
        out.append([t.clone() for t in theta])
    return out


def _adan_pytorch_model(init, grads_fn, steps, lr, betas, eps, wd) -> list[list[torch.Tensor]]:
    """What adan-pytorch 0.1.0 measurably computes, in official-convention betas.

    Differences from the reference: call 1 only records g1 (plus the weight-decay division);
    moments start at call 2 with diff = g2 - g1 (not 0); bias corrections use the call count k,
    i.e. one more than the number of moment updates.
    """
    b1, b2, b3 = betas
    theta = [p.clone() for p in init]
    m = [torch.zeros_like(p) for p in init]
    v = [torch.zeros_like(p) for p in init]
    n = [torch.zeros_like(p) for p in init]
    prev = None
    out = []
    for k in range(1, steps + 1):
        g = grads_fn(theta)
        for i in range(len(theta)):
            if prev is not None:
                diff = g[i] - prev[i]
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * diff
                n[i] = b3 * n[i] + (1 - b3) * (g[i] + b2 * diff) ** 2
            cm, cv, cn = 1 / (1 - b1**k), 1 / (1 - b2**k), 1 / (1 - b3**k)
            step = (m[i] * cm + b2 * v[i] * cv) * (lr / ((n[i] * cn).sqrt() + eps))
            theta[i] = (theta[i] - step) / (1 + lr * wd)
        prev = g
        out.append([t.clone() for t in theta])
    return out


def _run_optimizer(name, init, grads_fn, steps, wd, foreach=None) -> list[list[torch.Tensor]]:
    params = [nn.Parameter(p.clone()) for p in init]
    opt = build_optimizer(params, name, lr=LR, betas=BETAS, weight_decay=wd, eps=EPS, foreach=foreach)
    out = []
    for _ in range(steps):
        for p, g in zip(params, grads_fn([p.detach() for p in params])):
            p.grad = g
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def _max_abs_diff(a, b) -> float:
    return max((x - y).abs().max().item() for sa, sb in zip(a, b) for x, y in zip(sa, sb))


# ----------------------------------------------------------------------------- Adan parity

@pytest.mark.parametrize("wd", [0.0, 0.02])
@pytest.mark.parametrize("foreach", [False, True])
def test_timm_adan_matches_reference(wd, foreach):
    init, grads_fn = _toy_problem()
    ref = _reference_adan(init, grads_fn, STEPS, LR, BETAS, EPS, wd)
    got = _run_optimizer("adan", init, grads_fn, STEPS, wd, foreach=foreach)
    # Measured: <= 1e-15 (float64 round-off only). The trajectory really moves (~1 per param).
    assert _max_abs_diff(got, ref) < 1e-12
    assert _max_abs_diff(ref[-1:], [init]) > 0.5


@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_adan_pytorch_documented_quirks(wd):
    init, grads_fn = _toy_problem()
    ref = _reference_adan(init, grads_fn, STEPS, LR, BETAS, EPS, wd)
    model = _adan_pytorch_model(init, grads_fn, STEPS, LR, BETAS, EPS, wd)
    got = _run_optimizer("adan_pytorch", init, grads_fn, STEPS, wd)
    # Its first step moves nothing but the weight-decay division.
    for p0, p1 in zip(init, got[0]):
        torch.testing.assert_close(p1, p0 / (1 + LR * wd), rtol=0, atol=1e-15)
    # With the betas converted it is exactly the quirk model above...
    assert _max_abs_diff(got, model) < 1e-12
    # ...which is NOT the official rule, even allowing for the skipped first step (compare its
    # step k+1 with the reference's step k): the diff-at-start and bias-correction offset remain.
    assert _max_abs_diff(got, ref) > 1e-2
    assert _max_abs_diff(got[1:], ref[:-1]) > 1e-3


# ----------------------------------------------------------------------------- build_optimizer

def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(2))]


def test_betas_are_converted_for_adan_pytorch():
    opt = build_optimizer(_params(), "adan_pytorch", betas=(0.98, 0.92, 0.99))
    assert opt.param_groups[0]["betas"] == pytest.approx((0.02, 0.08, 0.01), abs=1e-15)
    opt = build_optimizer(_params(), "adan")
    assert opt.param_groups[0]["betas"] == (0.98, 0.92, 0.99)
    assert build_optimizer(_params(), "adamw").param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", ["adan", "adan_pytorch"])
def test_one_minus_beta_convention_is_rejected(name):
    with pytest.raises(ValueError, match=r"official convention \(0.98, 0.92, 0.99\)"):
        build_optimizer(_params(), name, betas=(0.02, 0.08, 0.01))


@pytest.mark.parametrize(
    "name, betas, message",
    [
        ("adan", (1.0, 0.92, 0.99), r"betas\[0\] = 1.0 is outside \(0, 1\)"),
        ("adan", (0.98, 0.92, 0.0), r"betas\[2\] = 0.0 is outside"),
        ("adan", (0.9, 0.999), "takes 3 betas"),
        ("adamw", (0.98, 0.92, 0.99), "takes 2 betas"),
    ],
)
def test_bad_betas(name, betas, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(_params(), name, betas=betas)


def test_mixed_betas_warn_and_adan_pytorch_foreach_errors():
    with pytest.warns(UserWarning, match="1 - beta"):
        build_optimizer(_params(), "adan", betas=(0.98, 0.08, 0.99))
    with pytest.raises(ValueError, match="no foreach"):
        build_optimizer(_params(), "adan_pytorch", foreach=True)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(_params(), "sgd")


# ----------------------------------------------------------------------------- schedule

def test_warmup_schedule_values():
    f = warmup_lr_lambda(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr_lambda(0)(0) == 1.0
    with pytest.raises(ValueError):
        warmup_lr_lambda(-1)

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        opt.step()
        sched.step()
    assert lrs == [0.5, 1.0, 1.5, 2.0, 2.0]


def test_scheduler_state_resumes_exactly():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, warmup_steps=10)
    sched2.load_state_dict(saved)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # the optimizer's lr is restored with its own state
    assert sched2.last_epoch == 3
    assert sched2.get_last_lr() == pytest.approx([0.4])
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- EMA

def _linear(w: list[float], b: float) -> nn.Linear:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.fill_(b)
    return m


def test_ema_update_matches_hand_computation():
    model = _linear([1.0, 2.0], 0.5)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.bias.fill_(1.5)
    assert ema.update(model) == 0.9
    # 0.9 * [1, 2] + 0.1 * [3, 4] = [1.2, 2.2]; 0.9 * 0.5 + 0.1 * 1.5 = 0.6
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[1.2, 2.2]]))
    torch.testing.assert_close(ema.shadow["bias"], torch.tensor([0.6]))
    ema.update(model, decay=0.5)  # 0.5 * [1.2, 2.2] + 0.5 * [3, 4] = [2.1, 3.1]
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[2.1, 3.1]]))
    torch.testing.assert_close(ema.shadow["bias"], torch.tensor([1.05]))


def test_ema_decay_default_and_range():
    model = _linear([0.0, 0.0], 0.0)
    assert EMA(model).decay == 0.9999
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        EMA(model).update(model, decay=-0.1)


def test_ema_shadow_is_float32_for_bf16_model_and_buffers_are_copied():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    ema = EMA(model, decay=0.75)
    assert all(ema.shadow[n].dtype == torch.float32 for n in ema._param_names)
    w0 = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.75 * w0 + 0.25 * model[0].weight.float())
    assert ema.shadow["1.running_mean"].eq(3.0).all()  # copied, not averaged
    assert ema.shadow["1.num_batches_tracked"].item() == 7


def test_ema_state_dict_is_a_loadable_model_state_dict_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)

    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert list(saved) == list(model.state_dict())

    fresh = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fresh.load_state_dict(saved, strict=True)  # sampling loads the EMA like this
    ema2 = EMA(fresh)
    ema2.load_state_dict(saved)
    for name, t in ema.state_dict().items():
        assert torch.equal(ema2.state_dict()[name], t)
    with pytest.raises(KeyError, match="missing"):
        ema2.load_state_dict({k: v for k, v in saved.items() if k != "0.bias"})


def test_ema_copy_to_and_swapped_in_restores():
    model = _linear([1.0, 2.0], 0.5)
    ema = EMA(model, decay=0.0)  # decay 0: shadow = latest weights
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    ema.update(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 6.0]]))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(model):
            assert model.weight.tolist() == [[3.0, 4.0]]
            raise RuntimeError("boom")
    assert model.weight.tolist() == [[5.0, 6.0]]  # restored despite the exception
    ema.copy_to(model)
    assert model.weight.tolist() == [[3.0, 4.0]]


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(2, 2, bias=False)
        self.dec = nn.Linear(2, 2, bias=False)
        self.dec.weight = self.enc.weight


def test_ema_tied_weights_averaged_once_and_wrong_model_named():
    model = _Tied()
    ema = EMA(model, decay=0.5)
    w0 = model.enc.weight.detach().clone()
    with torch.no_grad():
        model.enc.weight.add_(2.0)
    ema.update(model)
    sd = ema.state_dict()
    assert set(sd) == {"enc.weight", "dec.weight"}
    torch.testing.assert_close(sd["dec.weight"], w0 + 1.0)  # one lerp, not two
    _Tied().load_state_dict(sd, strict=True)
    with pytest.raises(KeyError, match="same unwrapped model"):
        ema.update(nn.Linear(2, 2))
