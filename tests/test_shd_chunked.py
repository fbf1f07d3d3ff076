"""shd_term (chunked SHD over query-row blocks) against the whole-map path it must reproduce."""

from __future__ import annotations

import pytest
import torch
from shd_diffusion.profiling import cpu_peak_bytes as peak_bytes

from shd_diffusion import shd
from shd_diffusion.shd import chunked as shd_chunked

F64 = torch.float64


# tiny tensors: threads only contend (conftest); numerics: rerun on every CPU vector path (test_vector_paths)
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def probs(q, k, bias=None, temperature=1.0):
    """Whole maps softmax((q k^T / sqrt(d) + bias) / T) in q's dtype (the oracle's maps)."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    logits = logits if bias is None else logits + bias
    return (logits / temperature).softmax(-1)


def make_pair(dtype=F64, b=2, h_t=16, h_s=6, n=10, d_s=4, d_t=5, dim=16, bias=True, seed=1):
    """Random layer pair: student q, k (with grad), teacher q, k, v, out weight, biases (1, H, N, N)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    s_q, s_k = r(b, h_s, n, d_s, s=1.5).requires_grad_(), r(b, h_s, n, d_s).requires_grad_()
    t_q, t_k, t_v, w = r(b, h_t, n, d_t, s=2.0), r(b, h_t, n, d_t), r(b, h_t, n, d_t), r(dim, h_t * d_t)
    s_b = r(1, h_s, n, n).requires_grad_() if bias else None
    t_b = r(1, h_t, n, n) if bias else None
    return dict(student_q=s_q, student_k=s_k, teacher_q=t_q, teacher_k=t_k, teacher_v=t_v, out_weight=w,
                student_bias=s_b, teacher_bias=t_b)


def dense_term(p, groups=None, temperature=1.0, loss="kl", mode="lstsq"):
    """Today's whole-map path: maps -> squeeze_heads (alpha at T=1) -> apply_alphas(T_a) -> shd_loss."""
    h_s = p["student_q"].shape[1]
    t1 = probs(p["teacher_q"], p["teacher_k"], p["teacher_bias"])
    _, alphas = shd.squeeze_heads(t1, p["teacher_v"], p["out_weight"], h_s, groups=groups, mode=mode,
                                  head_outputs=t1 @ p["teacher_v"])
    resolved = shd.resolve_groups(p["teacher_q"].shape[1], h_s, mode, groups)
    target = shd.apply_alphas(probs(p["teacher_q"], p["teacher_k"], p["teacher_bias"], temperature), alphas, resolved)
    student = probs(p["student_q"], p["student_k"], p["student_bias"], temperature)
    return shd.shd_loss([student], [target], beta=1.0, kind=loss), alphas


def grads(loss, p):
    """Gradients of a per-sample-weighted sum (weights 1, 2, ...: each sample's own upstream gradient)."""
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)
    wrt = [p["student_q"], p["student_k"]] + ([p["student_bias"]] if p["student_bias"] is not None else [])
    return torch.autograd.grad((loss * weights).sum(), wrt)


def rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


# float64: both paths are exact up to summation order, so 1e-12 relative. float32: the block sums
# and log_softmax (vs log of softmax) reorder roundings of ~1e-7 relative each over <= 16 heads x
# 10 keys; 2e-5 relative leaves ~100x margin over the 2e-7 measured and still fails on any real
# mistake (a wrong alpha or a missing row moves these values by > 1e-2).
TOL = {F64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "mode, h_s, groups, temperature, loss, chunk, bias",
    [
        ("lstsq", 6, None, 2.0, "kl", 3, True),  # MDT-like: biases, uneven 16 -> 6 (3,3,3,3,2,2), T_a != 1
        ("lstsq", 6, None, 1.0, "kl", 10, False),  # DiT-like, chunk = N: the whole-map computation
        ("lstsq", 6, None, 2.0, "mse", 4, True),
        ("constant", 6, None, 2.0, "kl", 3, True),
        ("hard", 6, None, 2.0, "kl", 1, True),
        ("progressive", 4, None, 2.0, "kl", 3, True),  # 16 -> 8 -> 4, two passes over the blocks
        # Head-matching-style explicit groups; 5-head groups are past the always-enumerated sizes.
        ("lstsq", 6, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10], [11], [12, 13], [14, 15]], 1.5, "kl", 7, True),
    ],
)
def test_chunked_term_equals_the_whole_map_path(dtype, mode, h_s, groups, temperature, loss, chunk, bias):
    p = make_pair(dtype, h_s=h_s, bias=bias)
    want, want_alpha = dense_term(p, groups, temperature, loss, mode)
    got, got_alpha = shd.shd_term(**p, groups=groups, temperature=temperature, chunk_size=chunk, loss=loss, mode=mode)
    assert got.shape == (2,) and got_alpha.shape == (2, 16)
    assert float(want.detach().min()) > 0
    assert rel(got, want) < TOL[dtype] and rel(got_alpha, want_alpha) < TOL[dtype]
    for g_got, g_want in zip(grads(got, p), grads(want, p)):
        assert rel(g_got, g_want) < TOL[dtype]


def test_teacher_outputs_only_spare_a_product():
    # The exported per-head outputs set the ridge's scale only: same alphas, same loss.
    p = make_pair(F64)
    t_out = probs(p["teacher_q"], p["teacher_k"], p["teacher_bias"]) @ p["teacher_v"]  # (B, H_t, N, d_t)
    want, want_alpha = shd.shd_term(**p, temperature=2.0, chunk_size=3)
    got, alpha = shd.shd_term(**p, temperature=2.0, chunk_size=3, teacher_out=t_out)
    assert rel(got, want) < 1e-12 and rel(alpha, want_alpha) < 1e-12
    with pytest.raises(ValueError, match="teacher_out"):
        shd.shd_term(**p, teacher_out=t_out[:, :, :5])


def test_block_size_does_not_change_the_numbers():
    p = make_pair(F64, n=13)
    ref, ref_alpha = shd.shd_term(**p, temperature=2.0, chunk_size=13)
    ref_grads = grads(ref, p)
    for chunk in (1, 5, 64):  # 64 > N: one block
        got, alpha = shd.shd_term(**p, temperature=2.0, chunk_size=chunk)
        assert rel(got, ref) < 1e-12 and rel(alpha, ref_alpha) < 1e-12
        assert all(rel(a, b) < 1e-12 for a, b in zip(grads(got, p), ref_grads))


def test_identity_squeeze_and_a_student_equal_to_its_teacher_give_zero():
    p = make_pair(F64, h_t=6, h_s=6, d_t=4)
    p.update(teacher_q=p["student_q"].detach(), teacher_k=p["student_k"].detach(), teacher_bias=p["student_bias"].detach())
    loss, alphas = shd.shd_term(**p, temperature=2.0, chunk_size=3)
    assert torch.equal(alphas, torch.ones_like(alphas))
    assert float(loss.detach().abs().max()) < 1e-12


def test_bf16_autocast_distils_the_float32_maps_of_the_rounded_q_and_k():
    # Under bf16 autocast the capture hands over bf16 q, k; the term must upcast them and compute
    # in float32 (autocast off), i.e. equal the float32 term of the same (rounded) values.
    p = make_pair(torch.float32)
    p16 = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    p32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p16.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, alpha = shd.shd_term(**p16, temperature=2.0, chunk_size=4)
    want, want_alpha = shd.shd_term(**p32, temperature=2.0, chunk_size=4)
    assert got.dtype == torch.float32 and alpha.dtype == torch.float32
    assert rel(got, want) < 1e-6 and rel(alpha, want_alpha) < 1e-6
    g16, g32 = grads(got, p16), grads(want, p32)
    assert g16[0].dtype == torch.bfloat16
    # bf16 keeps 8 bits: the gradients agree to bf16 rounding (2^-8 relative).
    assert all(rel(a.float(), b) < 2**-7 for a, b in zip(g16, g32))


def test_teacher_tensors_get_no_gradient():
    p = make_pair(F64)
    for k in ("teacher_q", "teacher_k", "teacher_v", "out_weight", "teacher_bias"):
        p[k].requires_grad_(True)
    loss, alphas = shd.shd_term(**p, temperature=2.0, chunk_size=3)
    assert not alphas.requires_grad
    got = torch.autograd.grad(loss.sum(), [p[k] for k in ("teacher_q", "teacher_k", "teacher_v", "out_weight")],
                              allow_unused=True)
    assert all(g is None for g in got)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(student_bias=torch.zeros(1, 6, 9, 10)), "student_bias"),
        (dict(teacher_bias=torch.zeros(3, 16, 10, 10)), "teacher_bias"),
        (dict(student_k=torch.zeros(2, 6, 10, 3)), "student_k"),
        (dict(teacher_v=torch.zeros(2, 16, 11, 5)), "teacher_q"),
        (dict(teacher_q=torch.zeros(2, 16, 9, 5), teacher_k=torch.zeros(2, 16, 9, 5), teacher_v=torch.zeros(2, 16, 9, 5)),
         "token grid"),
        (dict(out_weight=torch.zeros(16, 70)), "out_weight"),
        (dict(loss="l1"), "loss kind"),
    ],
)
def test_bad_inputs_name_the_setting(change, match):
    p = make_pair(torch.float32, bias=False)
    p.update(change)
    with pytest.raises(ValueError, match=match):
        shd.shd_term(**p)


def test_auto_chunk_size():
    # 256 MiB over (3*16 + 6*6) * B * N * 4 bytes per row, rounded down to a multiple of 16.
    assert shd.auto_chunk_size(32, 16, 6, 1024) == 16  # 24 rows fit
    assert shd.auto_chunk_size(16, 16, 6, 1024) == 48  # 48.8 rows fit
    assert shd.auto_chunk_size(2, 4, 2, 256) == 256  # everything fits: one block
    assert shd.auto_chunk_size(512, 16, 6, 4096) == 16  # nothing fits: at least 16 rows


def test_memory_grows_with_n_not_n_squared():
    # N = 1024, 16 -> 6 heads, batch 1, no bias (DiT), 64-row blocks. One whole float32 teacher map
    # stack is 16 * 1024^2 * 4 B = 64 MiB; a block's temporaries are (16 + 6) * 64 * 1024 * 4 B =
    # 5.5 MiB each, a few alive at once (measured: 17 MiB chunked, 280 MiB whole maps, forward +
    # backward). The target: the chunked peak <= 1/8 of the whole-map path's at N = 1024.
    # Allocation sizes follow from the shapes, not from the CPU's kernels.
    p = make_pair(torch.float32, b=1, n=1024, d_s=16, d_t=16, dim=64, bias=False)
    whole_teacher = 16 * 1024 * 1024 * 4

    def chunked():
        loss, _ = shd.shd_term(**p, temperature=2.0, chunk_size=64)
        loss.sum().backward()

    def whole():
        loss, _ = dense_term(p, temperature=2.0)
        loss.sum().backward()

    peak_chunked, peak_whole = peak_bytes(chunked), peak_bytes(whole)
    assert peak_chunked < whole_teacher / 2
    assert peak_whole > whole_teacher
    assert 8 * peak_chunked <= peak_whole


def test_recompute_backward_matches_checkpointed_blocks():
    # The alternative the module doc compares against (torch.utils.checkpoint per block, as in
    # benchmarks/bench_squeeze.py --backward checkpoint) computes the same gradients.
    p = make_pair(F64)
    loss, alphas = shd.shd_term(**p, temperature=2.0, chunk_size=3)
    spec = shd_chunked._Spec(shd.default_groups(16, 6), 2.0, 3, "kl", 1e-10, 4**-0.5, 5**-0.5, F64)
    ck = shd_chunked._checkpointed_map_loss(p["student_q"], p["student_k"], p["student_bias"], p["teacher_q"],
                                            p["teacher_k"], p["teacher_bias"], alphas, spec)
    assert rel(ck, loss) < 1e-12
    assert all(rel(a, b) < 1e-12 for a, b in zip(grads(ck, p), grads(loss, p)))


def test_head_similarity_from_q_k_equals_the_whole_map_similarity():
    p = make_pair(F64, n=11)
    maps = probs(p["teacher_q"], p["teacher_k"], p["teacher_bias"])
    want = shd.head_similarity(maps)
    for chunk in (3, 11):
        got = shd.head_similarity_qk(p["teacher_q"], p["teacher_k"], p["teacher_bias"], chunk_size=chunk)
        assert rel(got, want.double()) < 1e-6  # head_similarity computes in float32 (normalised maps)
