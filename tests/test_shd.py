"""SHD math (shd_diffusion.shd): alpha vs brute force, grouping, modes, layer mapping, loss."""

import itertools
import math
import typing

import pytest
import torch

from shd_diffusion import shd
from shd_diffusion.attention import capture_attention
from shd_diffusion.models import create_model
from shd_diffusion.shd import solve as shd_solve
from shd_diffusion.shd.groups import SQUEEZE_MODES as _MODES
from shd_oracles import naive_squeeze_alphas, naive_squeeze_objective
from shd_diffusion.shd import (
    HeadSqueezer,
    SqueezeMode,
    apply_alphas,
    cluster_heads,
    default_groups,
    hard_selection,
    head_similarity,
    layer_mapping,
    progressive_groups,
    project_simplex,
    shd_loss,
    squeeze_heads,
    squeeze_layers,
    squeeze_objective,
    validate_groups,
    validate_pair,
)

F64 = torch.float64


# tiny tensors: threads only contend (conftest); numerics: rerun on every CPU vector path (test_vector_paths)
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def make_teacher(seed, b=2, h=4, n=6, d=3, dim=8, dtype=F64, sharp=2.0):
    """Random teacher: softmax maps (B, H, N, N), values (B, H, N, d), out weight (D, H*d)."""
    g = torch.Generator().manual_seed(seed)
    attn = (torch.randn(b, h, n, n, generator=g, dtype=F64) * sharp).softmax(-1).to(dtype)
    values = torch.randn(b, h, n, d, generator=g, dtype=F64).to(dtype)
    weight = torch.randn(dim, h * d, generator=g, dtype=F64).to(dtype)
    return attn, values, weight


def explicit_objective(attn, values, weight, group, alpha):
    """Eq. (6) for one sample, written out with the N x D products; alpha (P, k) candidates -> (P,)."""
    d = values.shape[-1]
    xs = [values[i] @ weight[:, i * d : (i + 1) * d].T for i in group]  # X_i (N, D)
    s = sum(xs)
    target = sum(attn[i] @ x for i, x in zip(group, xs))
    mixed = torch.einsum("pk,knm->pnm", alpha, attn[list(group)])  # (P, N, N)
    return (mixed @ s - target).pow(2).sum((1, 2))


def simplex_grid(k, steps):
    """All alpha on the k-simplex with coordinates in multiples of 1/steps."""
    pts = [c for c in itertools.product(range(steps + 1), repeat=k - 1) if sum(c) <= steps]
    grid = torch.tensor(pts, dtype=F64) / steps
    return torch.cat([grid, 1 - grid.sum(1, keepdim=True)], dim=1)


def lbfgs_affine_minimum(attn, values, weight, group):
    """Brute force: minimise eq. (6) over sum(alpha) = 1 with LBFGS on the free k-1 weights."""
    k = len(group)
    t = torch.full((k - 1,), 1.0 / k, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [t], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        alpha = torch.cat([t, 1 - t.sum(0, keepdim=True)])
        loss = explicit_objective(attn, values, weight, group, alpha[None])[0]
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([t, 1 - t.sum(0, keepdim=True)]).detach()


# --------------------------------------------------------------------------------------------
# alpha
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,student", [(4, 2), (6, 2), (5, 2)])
def test_alpha_matches_lbfgs_brute_force(heads, student):
    # groups of 2, of 3, and the uneven 5 -> 2 split (3, 2); unconstrained eq. (6) optimum
    attn, values, weight = make_teacher(heads, b=2, h=heads)
    _, alphas = squeeze_heads(attn, values, weight, student, project=False)
    for b in range(2):
        for group in default_groups(heads, student):
            brute = lbfgs_affine_minimum(attn[b], values[b], weight, group)
            torch.testing.assert_close(alphas[b, group], brute, atol=1e-6, rtol=0)


def test_alpha_on_grid_k2_inside_simplex():
    attn, values, weight = make_teacher(1, b=1, h=2)
    _, alphas = squeeze_heads(attn, values, weight, 1)
    grid = simplex_grid(2, 20000)
    f = explicit_objective(attn[0], values[0], weight, [0, 1], grid)
    best = grid[f.argmin()]
    assert 0 < best[0] < 1  # interior case
    torch.testing.assert_close(alphas[0], best, atol=1e-4, rtol=0)
    assert explicit_objective(attn[0], values[0], weight, [0, 1], alphas[:1])[0] <= f.min() + 1e-12


def test_head_space_equals_naive_n_by_d_16_to_6():
    # uneven 3,3,3,3,2,2 groups: alphas and eq. (6) residuals agree with the explicit products
    attn, values, weight = make_teacher(2, b=3, h=16, n=8, d=4, dim=20)
    groups = default_groups(16, 6)
    _, fast = squeeze_heads(attn, values, weight, 6, project=False)
    naive = naive_squeeze_alphas(attn, values, weight, groups)
    torch.testing.assert_close(fast, naive, atol=1e-9, rtol=0)
    torch.testing.assert_close(
        squeeze_objective(attn, values, weight, groups, fast),
        naive_squeeze_objective(attn, values, weight, groups, fast),
        atol=1e-9, rtol=1e-10,
    )
    # the optimum beats any perturbation that keeps sum(alpha) = 1
    bump = torch.zeros_like(fast)
    bump[:, 0], bump[:, 1] = 0.01, -0.01
    worse = naive_squeeze_objective(attn, values, weight, groups, fast + bump)
    assert (worse[:, 0] > naive_squeeze_objective(attn, values, weight, groups, fast)[:, 0]).all()


def test_k2_outside_simplex_projects_to_constrained_minimum():
    # X_2 = -2 X_1 makes the unconstrained optimum alpha = (-1, 2) analytically:
    # a* = <E S, E X_1> / ||E S||^2 with E = A_1 - A_2 and S = -X_1.
    attn, values, weight = make_teacher(3, b=1, h=2)
    values[:, 1] = -2 * values[:, 0]
    weight[:, 3:6] = weight[:, 0:3]
    _, free = squeeze_heads(attn, values, weight, 1, project=False)
    torch.testing.assert_close(free[0], torch.tensor([-1.0, 2.0], dtype=F64), atol=1e-8, rtol=0)
    maps, alphas = squeeze_heads(attn, values, weight, 1)
    grid = simplex_grid(2, 1000)
    f = explicit_objective(attn[0], values[0], weight, [0, 1], grid)
    torch.testing.assert_close(alphas[0], grid[f.argmin()], atol=1e-9, rtol=0)  # the vertex (0, 1)
    torch.testing.assert_close(maps[:, 0], attn[:, 1])


def test_k3_outside_simplex_exact_constrained_minimum():
    # find a deterministic random case whose unconstrained optimum clearly leaves the simplex
    for seed in range(200):
        attn, values, weight = make_teacher(100 + seed, b=1, h=3)
        free = naive_squeeze_alphas(attn, values, weight, [[0, 1, 2]])
        if free.min() < -0.05:
            break
    else:
        pytest.fail("no test case with alpha outside the simplex")
    _, alphas = squeeze_heads(attn, values, weight, 1)
    assert alphas.min() >= 0 and abs(alphas.sum().item() - 1) < 1e-12
    grid = simplex_grid(3, 300)
    f = explicit_objective(attn[0], values[0], weight, [0, 1, 2], grid)
    mine = explicit_objective(attn[0], values[0], weight, [0, 1, 2], alphas)[0]
    assert mine <= f.min() + 1e-10  # no grid point on the simplex does better
    torch.testing.assert_close(alphas[0], grid[f.argmin()], atol=5e-3, rtol=0)
    # the Euclidean projection of the free alpha is a different (worse) rule
    projected = project_simplex(free)
    assert explicit_objective(attn[0], values[0], weight, [0, 1, 2], projected)[0] >= mine - 1e-12


def test_large_group_fallback_matches_enumeration(monkeypatch):
    attn, values, weight = make_teacher(7, b=64, h=3)
    free = naive_squeeze_alphas(attn, values, weight, [[0, 1, 2]])
    assert (free.min(1).values < -0.01).sum() >= 3  # some samples need the simplex
    _, exact = squeeze_heads(attn, values, weight, 1)
    monkeypatch.setattr(shd_solve, "_MAX_ENUM_K", 1)  # force projected gradient
    _, pgd = squeeze_heads(attn, values, weight, 1)
    torch.testing.assert_close(pgd, exact, atol=1e-6, rtol=0)


MIXED_16_TO_6 = [[0, 5, 9], [1, 14], [2, 7, 11], [3, 12, 15], [4, 8], [6, 10, 13]]  # sizes 3,2,3,3,2,3


def per_group_alphas(attn, values, weight, groups, **kwargs):
    """Oracle for the batched solve: each group squeezed on its own (its heads, its W columns)."""
    d = values.shape[-1]
    out = torch.empty(attn.shape[:2], dtype=torch.float64 if attn.dtype == F64 else torch.float32)
    for group in groups:
        cols = torch.cat([torch.arange(i * d, (i + 1) * d) for i in group])
        _, a = squeeze_heads(attn[:, group], values[:, group], weight[:, cols], 1, **kwargs)
        out[:, group] = a
    return out


@pytest.mark.parametrize("dtype,atol", [(F64, 1e-12), (torch.float32, 2e-6)])
def test_batched_groups_equal_per_group_solves(dtype, atol):
    # non-contiguous groups of mixed sizes: two batched solves (sizes 3 and 2), results scattered
    # back to the right heads; the simplex step is active for some (sample, group) pairs
    attn, values, weight = make_teacher(22, b=16, h=16, n=8, d=3, dim=12, dtype=dtype)
    free = naive_squeeze_alphas(attn, values, weight, MIXED_16_TO_6)
    assert (free < 0).any() and (free >= 0).all(1).any()  # both branches of the selection occur
    for project in (True, False):
        _, batched = squeeze_heads(attn, values, weight, 6, groups=MIXED_16_TO_6, project=project)
        oracle = per_group_alphas(attn, values, weight, MIXED_16_TO_6, project=project)
        torch.testing.assert_close(batched, oracle, atol=atol, rtol=0)
    # the unconstrained solution also matches the explicit N x D formula
    _, batched = squeeze_heads(attn, values, weight, 6, groups=MIXED_16_TO_6, project=False)
    torch.testing.assert_close(batched.double(), free, atol=1e-9 if dtype == F64 else 1e-4, rtol=0)


class HostSync(AssertionError):
    pass


def forbid_host_sync(monkeypatch):
    """Make every device-to-host read (bool, item, ...) and every tensor/list index raise."""

    def refuse(*args, **kwargs):
        raise HostSync("host sync")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("__getitem__", "__setitem__"):
        original = getattr(torch.Tensor, name)

        def checked(self, key, *rest, _original=original):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, (list, torch.Tensor)) for k in keys):
                raise HostSync(f"index with {type(key).__name__}: a host-to-device copy on GPU")
            return _original(self, key, *rest)

        monkeypatch.setattr(torch.Tensor, name, checked)


def test_lstsq_small_groups_never_sync_with_the_host(monkeypatch):
    attn, values, weight = make_teacher(22, b=16, h=16, n=8, d=3, dim=12, dtype=torch.float32)
    assert (naive_squeeze_alphas(attn, values, weight, MIXED_16_TO_6) < 0).any()  # simplex step needed
    big, big_v, big_w = make_teacher(23, b=16, h=10, n=8, d=3, dim=12, dtype=torch.float32)
    assert (naive_squeeze_alphas(big, big_v, big_w, default_groups(10, 2)) < 0).any()
    want, _ = squeeze_heads(attn, values, weight, 6, groups=MIXED_16_TO_6)
    with monkeypatch.context() as m:
        forbid_host_sync(m)
        got, _ = squeeze_heads(attn, values, weight, 6, groups=MIXED_16_TO_6)
        squeeze_heads(attn, values, weight, 6)  # default contiguous groups
        # groups of 5 heads still branch on the host (only the samples that need the simplex)
        with pytest.raises(HostSync):
            squeeze_heads(big, big_v, big_w, 2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("ridge", [0.0, -1e-3, float("nan"), float("inf"), 1e-20])
def test_ridge_must_be_positive_and_above_epsilon(ridge):
    attn, values, weight = make_teacher(5, b=2, h=2, dtype=torch.float32)
    attn[:, 1], values[:, 1] = attn[:, 0], values[:, 0]  # indistinguishable heads: singular at ridge 0
    weight[:, 3:6] = weight[:, 0:3]
    with pytest.raises(ValueError, match=rf"ridge={ridge!r} is not a finite number >= 1\.2e-07"):
        squeeze_heads(attn, values, weight, 1, ridge=ridge)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_smallest_allowed_ridge_keeps_identical_heads_finite(dtype, k):
    attn, values, weight = make_teacher(24, b=3, h=k, dtype=dtype)
    attn[:] = attn[:, :1]
    values[:] = values[:, :1]
    weight[:] = weight[:, :3].repeat(1, k)
    _, alphas = squeeze_heads(attn, values, weight, 1, ridge=torch.finfo(dtype).eps)
    torch.testing.assert_close(alphas, torch.full((3, k), 1 / k, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_face_feasibility_is_relative_to_alpha_scale(dtype):
    slack = 64 * torch.finfo(dtype).eps  # the documented rule: >= -64 eps max_i |alpha_i|
    for scale in (1.0, 1e3):
        inside = torch.tensor([scale, -0.5 * slack * scale, 0.0], dtype=dtype)
        outside = torch.tensor([scale, -2.0 * slack * scale, 0.0], dtype=dtype)
        assert shd_solve._face_feasible(inside) and not shd_solve._face_feasible(outside), scale


def test_float32_simplex_solutions_match_float64():
    # 64 samples, several outside the simplex: the float32 face selection (with its relative
    # feasibility slack) picks the same constrained minimiser as float64
    attn, values, weight = make_teacher(7, b=64, h=3)
    _, a64 = squeeze_heads(attn, values, weight, 1)
    _, a32 = squeeze_heads(attn.float(), values.float(), weight.float(), 1)
    assert ((a64 == 0).any(1)).sum() >= 3  # the constraint is active for some samples
    torch.testing.assert_close(a32.double(), a64, atol=1e-4, rtol=0)


def test_project_simplex_known_values():
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, -1.0], [0.2, 0.3, 0.5]], dtype=F64)
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=F64)
    torch.testing.assert_close(project_simplex(v), want)


def test_squeezed_rows_are_distributions_float32():
    attn, values, weight = make_teacher(4, b=4, h=12, n=16, d=8, dim=32, dtype=torch.float32, sharp=4.0)
    for mode in ("lstsq", "constant", "hard", "progressive"):
        maps, alphas = squeeze_heads(attn, values, weight, 3, mode=mode)
        assert maps.shape == (4, 3, 16, 16)
        assert maps.min() >= 0, mode
        torch.testing.assert_close(maps.sum(-1), torch.ones(4, 3, 16), atol=1e-5, rtol=0)
        assert alphas.min() >= 0


def test_identical_heads_are_degenerate_but_stable():
    attn, values, weight = make_teacher(5, b=2, h=2, dtype=torch.float32)
    attn[:, 1], values[:, 1] = attn[:, 0], values[:, 0]
    weight[:, 3:6] = weight[:, 0:3]
    maps, alphas = squeeze_heads(attn, values, weight, 1)
    torch.testing.assert_close(alphas, torch.full((2, 2), 0.5))  # the ridge centres on 1/k
    torch.testing.assert_close(maps[:, 0], attn[:, 0])


def test_identity_when_head_counts_match():
    attn, values, weight = make_teacher(6, h=4, dtype=torch.bfloat16)
    maps, alphas = squeeze_heads(attn, values, weight, 4)
    assert torch.equal(maps, attn)
    assert torch.equal(alphas, torch.ones(2, 4))
    maps, _ = squeeze_heads(attn, values, weight, 4, groups=[[1], [0], [2], [3]])
    assert torch.equal(maps, attn[:, [1, 0, 2, 3]])


def test_bf16_inputs_close_to_float32():
    attn, values, weight = make_teacher(8, b=2, h=6, n=16, d=8, dim=32, dtype=torch.float32)
    maps32, a32 = squeeze_heads(attn, values, weight, 3)
    maps16, a16 = squeeze_heads(attn.bfloat16(), values.bfloat16(), weight.bfloat16(), 3)
    assert maps16.dtype == torch.bfloat16 and a16.dtype == torch.float32
    torch.testing.assert_close(a16, a32, atol=0.03, rtol=0)
    torch.testing.assert_close(maps16.float(), maps32, atol=1e-2, rtol=0)
    # the float32 solve on the bf16-rounded inputs is what the bf16 path computes
    _, a_round = squeeze_heads(attn.bfloat16().float(), values.bfloat16().float(), weight.bfloat16().float(), 3)
    torch.testing.assert_close(a16, a_round, atol=1e-6, rtol=0)


def test_autocast_does_not_change_the_float32_solve():
    # the training step runs under bf16 autocast; the alpha solve must stay float32
    attn, values, weight = make_teacher(26, b=4, h=16, n=8, d=4, dim=16, dtype=torch.float32)
    for mode in ("lstsq", "progressive"):
        heads = 6 if mode == "lstsq" else 4
        maps, alphas = squeeze_heads(attn, values, weight, heads, mode=mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps_ac, alphas_ac = squeeze_heads(attn, values, weight, heads, mode=mode)
        assert alphas_ac.dtype == torch.float32 and maps_ac.dtype == torch.float32
        torch.testing.assert_close(alphas_ac, alphas, atol=1e-6, rtol=0)
        torch.testing.assert_close(maps_ac, maps, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Groups and modes
# --------------------------------------------------------------------------------------------


def test_default_groups():
    assert default_groups(16, 6) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13], [14, 15]]
    assert default_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert default_groups(12, 6) == [[2 * i, 2 * i + 1] for i in range(6)]
    with pytest.raises(ValueError, match="cannot create new ones"):
        default_groups(6, 8)


@pytest.mark.parametrize(
    "groups,match",
    [
        ([[0, 1], [2, 3]], "has 2 groups but the student has 3 heads"),
        ([[0, 1], [], [2, 3]], "group 1 is empty"),
        ([[0, 1], [1, 2], [3]], "appears in head groups 0 and 1"),
        ([[0, 1], [2], [4]], "out of range"),
        ([[0], [1], [2]], r"teacher heads \[3\] are in no head group"),
    ],
)
def test_explicit_groups_validated(groups, match):
    with pytest.raises(ValueError, match=match):
        validate_groups(groups, 4, 3)
    attn, values, weight = make_teacher(0, h=4)
    with pytest.raises(ValueError, match=match):
        squeeze_heads(attn, values, weight, 3, groups=groups)


def test_explicit_groups_used():
    attn, values, weight = make_teacher(9, h=4)
    groups = [[0, 3], [1, 2]]
    maps, alphas = squeeze_heads(attn, values, weight, 2, groups=groups)
    naive = naive_squeeze_alphas(attn, values, weight, groups)
    assert naive.min() > 0  # interior, so the constrained answer is the free one
    torch.testing.assert_close(alphas, naive, atol=1e-9, rtol=0)
    torch.testing.assert_close(maps, apply_alphas(attn, alphas, groups))


def match_heads(attn: torch.Tensor, num_student_heads: int, max_group_size: int | None = None) -> list[list[int]]:
    """Head matching on one calibration batch: mean per-sample similarity, then clustering."""
    return cluster_heads(head_similarity(attn) / attn.shape[0], num_student_heads, max_group_size)


def test_match_heads_groups_identical_heads():
    attn, _, _ = make_teacher(10, b=3, h=6, n=8, sharp=3.0)
    attn[:, 3], attn[:, 5], attn[:, 4] = attn[:, 0], attn[:, 1], attn[:, 2]
    assert match_heads(attn, 3) == [[0, 3], [1, 5], [2, 4]]
    # a cap on the group size is honoured
    attn, _, _ = make_teacher(11, b=2, h=6, n=8, sharp=3.0)
    attn[:, 1] = attn[:, 2] = attn[:, 0]
    assert match_heads(attn, 2, max_group_size=3) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="max_group_size"):
        match_heads(attn, 2, max_group_size=2)


def test_matched_squeezer_uses_calibration_groups():
    attn, values, weight = make_teacher(12, b=2, h=4, n=8, sharp=3.0)
    attn[:, 2], attn[:, 3] = attn[:, 0], attn[:, 1]
    sq = HeadSqueezer(4, 2, "lstsq", match_heads(attn, 2))
    assert sq.resolved == [[0, 2], [1, 3]] and sq.mode == "lstsq"
    _, alphas = sq(attn, values, weight)
    torch.testing.assert_close(alphas, torch.full((2, 4), 0.5, dtype=F64))


def test_constant_mode():
    attn, values, weight = make_teacher(13, h=5)
    maps, alphas = squeeze_heads(attn, values, weight, 2, mode="constant")
    torch.testing.assert_close(alphas, torch.tensor([[1 / 3] * 3 + [0.5] * 2] * 2, dtype=F64))
    torch.testing.assert_close(maps[:, 1], (attn[:, 3] + attn[:, 4]) / 2)


def test_hard_mode_selection():
    attn, values, weight = make_teacher(14, h=16, n=4)
    maps, alphas = squeeze_heads(attn, values, weight, 6, mode="hard", generator_seed=3)
    chosen = hard_selection(16, 6, 3)
    assert len(set(chosen)) == 6 and chosen == sorted(chosen)
    assert chosen == hard_selection(16, 6, 3)  # reproducible
    assert chosen != hard_selection(16, 6, 4)  # the seed matters
    assert torch.equal(alphas[0], torch.tensor([1.0 if i in chosen else 0.0 for i in range(16)], dtype=F64))
    assert torch.equal(maps, attn[:, chosen])


def test_progressive_matches_pairwise_merging_by_hand():
    attn, values, weight = make_teacher(15, b=2, h=8, n=6, d=2, dim=10)
    maps, alphas = squeeze_heads(attn, values, weight, 2, mode="progressive")

    # level 1: pairs (0,1) (2,3) (4,5) (6,7), pairwise optimum clipped to [0, 1]
    a1 = naive_squeeze_alphas(attn, values, weight, [[0, 1], [2, 3], [4, 5], [6, 7]]).clamp(0, 1)
    level1 = apply_alphas(attn, a1, [[0, 1], [2, 3], [4, 5], [6, 7]])  # (B, 4, N, N)
    # level 2: a merged head stands for S = X_{2i} + X_{2i+1}: concatenate its values (2d); the
    # out-projection column layout is unchanged because the pairs are contiguous.
    v2 = values.view(2, 4, 2, 6, 2).permute(0, 1, 3, 2, 4).reshape(2, 4, 6, 4)  # (B, 4, N, 2d)
    a2 = naive_squeeze_alphas(level1, v2, weight, [[0, 1], [2, 3]]).clamp(0, 1)
    want = a1 * a2.repeat_interleave(2, dim=1)
    torch.testing.assert_close(alphas, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(maps, apply_alphas(level1, a2, [[0, 1], [2, 3]]), atol=1e-12, rtol=0)


def test_one_level_progressive_is_the_pairwise_lstsq_squeeze():
    """H_t = 2 H_s (the demo's 12 -> 6): one merge level on adjacent pairs, the default lstsq groups,
    so the two modes must give the same alphas (the ablation study's kd_progressive repeats kd_shd)."""
    attn, values, weight = make_teacher(27, b=3, h=12, n=8, d=4, dim=24)
    assert progressive_groups(12, 6) == default_groups(12, 6)
    maps_p, alphas_p = squeeze_heads(attn, values, weight, 6, mode="progressive")
    maps_l, alphas_l = squeeze_heads(attn, values, weight, 6, mode="lstsq")
    torch.testing.assert_close(alphas_p, alphas_l, atol=1e-12, rtol=0)
    torch.testing.assert_close(maps_p, maps_l, atol=1e-12, rtol=0)


def test_progressive_groups_and_unreachable():
    assert progressive_groups(9, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert progressive_groups(9, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    with pytest.raises(ValueError, match="never reaches 6"):
        progressive_groups(16, 6)
    attn, values, weight = make_teacher(16, h=9)
    maps, alphas = squeeze_heads(attn, values, weight, 3, mode="progressive")
    torch.testing.assert_close(alphas[:, 8], torch.ones(2, dtype=F64))  # carried head
    torch.testing.assert_close(maps[:, 2], attn[:, 8])


def test_public_signatures_use_literals():
    assert get_args_of(squeeze_heads, "mode") == typing.get_args(SqueezeMode) == _MODES
    assert get_args_of(shd.resolve_groups, "mode") == _MODES
    assert get_args_of(HeadSqueezer, "mode") == _MODES
    assert get_args_of(shd_loss, "kind") == ("kl", "mse")
    assert get_args_of(shd_loss, "reduction") == ("sum", "mean")


def get_args_of(fn, name):
    return typing.get_args(typing.get_type_hints(fn)[name])


def test_mode_errors():
    attn, values, weight = make_teacher(0, h=4)
    with pytest.raises(ValueError, match="unknown squeeze mode"):
        squeeze_heads(attn, values, weight, 2, mode="soft")
    with pytest.raises(ValueError, match="explicit groups are only"):
        squeeze_heads(attn, values, weight, 2, groups=[[0, 1], [2, 3]], mode="hard")
    with pytest.raises(ValueError, match=r"\(D, H\*d\)"):
        squeeze_heads(attn, values, weight[:, :-1], 2)


# --------------------------------------------------------------------------------------------
# Temperature: alpha from T = 1, applied to softened maps
# --------------------------------------------------------------------------------------------


def test_alpha_from_t1_applied_to_softened_maps():
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(2, 4, 6, 6, generator=g, dtype=F64) * 3
    values = torch.randn(2, 4, 6, 3, generator=g, dtype=F64)
    weight = torch.randn(8, 12, generator=g, dtype=F64)
    probs, soft = logits.softmax(-1), (logits / 2).softmax(-1)
    sq = HeadSqueezer(4, 2)
    squeezed, alphas = sq(probs, values, weight, maps=soft)
    _, alphas_t1 = squeeze_heads(probs, values, weight, 2)
    _, alphas_soft = squeeze_heads(soft, values, weight, 2)
    torch.testing.assert_close(alphas, alphas_t1)
    assert (alphas - alphas_soft).abs().max() > 1e-3  # the choice is observable
    torch.testing.assert_close(squeezed, apply_alphas(soft, alphas_t1, [[0, 1], [2, 3]]))
    maps, layer_alphas = squeeze_layers(sq, [probs, probs], [values, values], [weight, weight], [soft, soft])
    assert len(maps) == 2 and torch.equal(maps[1], squeezed) and torch.equal(layer_alphas[0], alphas)


# --------------------------------------------------------------------------------------------
# Layer mapping and pair validation
# --------------------------------------------------------------------------------------------


def test_layer_mapping():
    assert layer_mapping(24, 48)[3] == 7  # student 4 <- teacher 8 (paper)
    assert layer_mapping(24, 48) == [2 * j + 1 for j in range(24)]
    # 28 -> 12: round(j * 7 / 3) = 2, 5, 7, 9, 12, 14, 16, 19, 21, 23, 26, 28 (1-indexed)
    assert layer_mapping(12, 28) == [1, 4, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27]
    # halves round up, not to even: 12 -> 8 gives j * 1.5 = 1.5, 3, 4.5, 6, ...
    assert layer_mapping(8, 12) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert layer_mapping(12, 12) == list(range(12))
    assert layer_mapping(3, 4, override=[0, 0, 3]) == [0, 0, 3]
    with pytest.raises(ValueError, match="has 2 entries but the student has 3 layers"):
        layer_mapping(3, 4, override=[0, 1])
    with pytest.raises(ValueError, match=r"override\[2\] = 4 is not a teacher layer"):
        layer_mapping(3, 4, override=[0, 1, 4])
    with pytest.raises(ValueError, match=r"override\[0\] = -1"):
        layer_mapping(3, 4, override=[-1, 1, 2])


def test_validate_pair():
    validate_pair(6, 12, 256, 256)
    with pytest.raises(ValueError, match="teacher has 256 tokens but student has 64: SHD needs the same token grid"):
        validate_pair(6, 12, 64, 256)
    with pytest.raises(ValueError, match="student has 8 heads > teacher 6 heads"):
        validate_pair(8, 6, 64, 64)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_shd_loss_hand_computed_kl_and_mse():
    teacher = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]], dtype=F64)  # (1, 1, 2, 2), has a 0
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]], dtype=F64)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 1.0 * math.log(1.0 / 0.5)  # the 0 * log 0 term is 0
    kl = shd_loss([student], [teacher], beta=2.0)
    torch.testing.assert_close(kl, torch.tensor([2.0 * (row0 + row1) / 2], dtype=F64))
    mse = shd_loss([student], [teacher], beta=3.0, kind="mse")
    want = 3.0 * (0.25**2 + 0.25**2 + 0.5**2 + 0.5**2) / 4
    torch.testing.assert_close(mse, torch.tensor([want], dtype=F64))


def test_shd_loss_zero_at_target_and_reductions():
    attn, values, weight = make_teacher(18, b=3, h=4, dtype=torch.float32)
    teacher = [squeeze_heads(attn, values, weight, 2)[0], squeeze_heads(attn.flip(1), values, weight, 2)[0]]
    for kind in ("kl", "mse"):
        zero = shd_loss([t.clone() for t in teacher], teacher, beta=2.0, kind=kind)
        assert zero.shape == (3,)
        torch.testing.assert_close(zero, torch.zeros(3), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(20)
    student = [torch.rand(3, 2, 6, 6, generator=g).softmax(-1) for _ in range(2)]
    for kind in ("kl", "mse"):
        total = shd_loss(student, teacher, beta=1.5, kind=kind, reduction="sum")
        mean = shd_loss(student, teacher, beta=1.5, kind=kind, reduction="mean")
        assert (total > 0).all()
        torch.testing.assert_close(total, mean * (2 * 2))  # L * H_s layer-heads


def test_shd_loss_gradients_reach_student_only():
    g = torch.Generator().manual_seed(19)
    q = torch.randn(2, 2, 5, 4, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, generator=g, requires_grad=True)
    student = (q @ k.transpose(-2, -1) / 2).softmax(-1)  # (B, H_s, N, N)
    t_logits = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    values = torch.randn(2, 4, 5, 3, generator=g)
    weight = torch.randn(8, 12, generator=g)
    teacher, _ = squeeze_heads(t_logits.softmax(-1), values, weight, 2)
    loss = shd_loss([student], [teacher], beta=2.0).sum()
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()
    assert k.grad is not None and k.grad.abs().sum() > 0
    assert t_logits.grad is None  # the squeezed teacher is a constant target


def test_shd_through_real_models():
    # tiny DiTs on the same 4x4 token grid: student 2 heads x 2 layers, teacher 4 heads x 4 layers
    torch.manual_seed(25)
    common = {"input_size": 16, "in_channels": 4, "num_classes": 10}
    student = create_model("DiT-S/4", hidden_size=32, depth=2, num_heads=2, **common)
    teacher = create_model("DiT-S/4", hidden_size=48, depth=4, num_heads=4, **common)
    g = torch.Generator().manual_seed(25)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t, y = torch.tensor([10, 700]), torch.tensor([1, 7])
    temperature = 2.0

    mapping = layer_mapping(2, 4)  # [1, 3]
    with torch.no_grad(), capture_attention(teacher, temperature, layers=mapping, export_values=True) as tstore:
        teacher(x, t, y)
    with capture_attention(student, temperature) as sstore:
        student(x, t, y)
    assert tstore.layer_indices == mapping and sstore.layer_indices == [0, 1]

    targets = []
    for s_map, probs, soft, v, w in zip(sstore.maps, tstore.probs, tstore.maps, tstore.values, tstore.out_weights):
        validate_pair(s_map.shape[1], probs.shape[1], s_map.shape[2], probs.shape[2])
        _, alphas = squeeze_heads(probs, v, w, 2)  # alpha from the T = 1 maps ...
        targets.append(apply_alphas(soft, alphas, default_groups(4, 2)))  # ... applied at T_a
        assert targets[-1].shape == s_map.shape == (2, 2, 16, 16)
        torch.testing.assert_close(targets[-1].sum(-1), torch.ones(2, 2, 16), atol=1e-5, rtol=0)

    loss = shd_loss(sstore.maps, targets, beta=2.0)
    assert loss.shape == (2,) and (loss > 0).all()
    loss.sum().backward()
    dim = 32
    for block in student.blocks:
        grad = block.attn.qkv.weight.grad  # rows: Q [0, D), K [D, 2D), V [2D, 3D)
        assert grad is not None and torch.isfinite(grad).all()
        assert grad[:dim].abs().sum() > 0 and grad[dim : 2 * dim].abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the squeezed targets in place of the student maps give zero loss
    zero = shd_loss([tgt.clone() for tgt in targets], targets, beta=2.0)
    torch.testing.assert_close(zero, torch.zeros(2), atol=1e-6, rtol=0)


def test_shd_loss_errors():
    g = torch.Generator().manual_seed(21)
    a = torch.rand(1, 2, 3, 3, generator=g)
    with pytest.raises(ValueError, match="squeeze the teacher"):
        shd_loss([a], [torch.rand(1, 4, 3, 3, generator=g)], beta=2.0)
    with pytest.raises(ValueError, match="unknown SHD loss kind"):
        shd_loss([a], [a], beta=2.0, kind="js")
    with pytest.raises(ValueError, match="same non-zero number"):
        shd_loss([a], [], beta=2.0)


def test_head_similarity_brute_force_and_chunked_matching():
    gen = torch.Generator().manual_seed(5)
    attn = torch.rand(6, 5, 4, 3, generator=gen, dtype=F64).softmax(-1)  # (B, H, N, M)
    sim = head_similarity(attn)
    brute = torch.zeros(5, 5, dtype=F64)
    for b in range(6):
        for i in range(5):
            for j in range(5):
                u, v = attn[b, i].flatten(), attn[b, j].flatten()
                brute[i, j] += (u @ v) / (u.norm() * v.norm())
    torch.testing.assert_close(sim.double(), brute, atol=1e-6, rtol=1e-6)
    # Summing chunks and clustering once gives the same groups as the whole batch at once.
    chunked = head_similarity(attn[:2]) + head_similarity(attn[2:5]) + head_similarity(attn[5:])
    assert cluster_heads(chunked / 6, 2) == match_heads(attn, 2)


def test_cluster_heads_merges_the_most_similar_pairs_first():
    sim = torch.eye(4)
    sim[0, 3] = sim[3, 0] = 0.9  # heads 0 and 3 are near-twins; 1 and 2 slightly alike
    sim[1, 2] = sim[2, 1] = 0.5
    assert cluster_heads(sim, 2) == [[0, 3], [1, 2]]
    assert cluster_heads(sim, 3) == [[0, 3], [1], [2]]
    with pytest.raises(ValueError, match="max_group_size=1"):
        cluster_heads(sim, 2, max_group_size=1)


def test_exported_head_outputs_give_the_same_alphas():
    # Z = (A_i V_i) only sets the ridge's scale; the teacher's own outputs spare its product.
    gen = torch.Generator().manual_seed(11)
    b, h, n, d = 3, 6, 12, 4
    attn = (torch.randn(b, h, n, n, generator=gen) * 2).softmax(-1)
    values = torch.randn(b, h, n, d, generator=gen)
    weight = torch.randn(16, h * d, generator=gen)
    outputs = attn @ values  # (B, H, N, d)
    for groups in (None, [[0, 3, 5], [1, 2], [4]]):
        maps, alphas = squeeze_heads(attn, values, weight, 3, groups=groups)
        maps_o, alphas_o = squeeze_heads(attn, values, weight, 3, groups=groups, head_outputs=outputs)
        torch.testing.assert_close(alphas_o, alphas, atol=1e-6, rtol=0)
        torch.testing.assert_close(maps_o, maps, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_outputs"):
        squeeze_heads(attn, values, weight, 3, head_outputs=outputs[:, :4])


def test_alpha_is_insensitive_to_a_large_shared_output():
    # Two heads that differ a little on top of a large common attention pattern (e.g. a shared
    # sink token): products are formed of map differences, so float32 rounding of the common
    # part must not swamp the solve. Oracle: the float64 solve.
    gen = torch.Generator().manual_seed(12)
    b, n, d = 4, 16, 8
    common = torch.zeros(b, 1, n, n)
    common[..., 0] = 3.0  # every query gives token 0 about half its attention
    logits = common + 0.5 * torch.randn(b, 2, n, n, generator=gen)
    attn = logits.softmax(-1)
    values = torch.randn(b, 2, n, d, generator=gen)
    values[:, :, 0] += 1e3  # token 0 carries a huge value vector
    weight = torch.randn(8, 2 * d, generator=gen)
    a32 = squeeze_heads(attn, values, weight, 1)[1]
    a64 = squeeze_heads(attn.double(), values.double(), weight.double(), 1)[1]
    assert float((a32.double() - a64).abs().max()) < 1e-3
