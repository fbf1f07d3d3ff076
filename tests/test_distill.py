"""Distillation terms besides SHD (shd_diffusion.distill): golden values and invariants."""

from __future__ import annotations

import pytest
import torch

from shd_diffusion.distill import (
    FeatureProjectors,
    capture_block_outputs,
    feature_loss,
    kd_loss,
    self_correlation_loss,
)
from shd_diffusion.models import create_model


def test_kd_loss_is_the_per_sample_mse_of_all_output_channels():
    student = torch.zeros(2, 8, 4, 4, requires_grad=True)
    teacher = torch.zeros(2, 8, 4, 4)
    teacher[0] = 1.0
    teacher[1, :4] = 2.0  # eps channels only
    loss = kd_loss(student, teacher)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([1.0, 2.0]))  # (4 ch x 4.0) / 8 ch = 2
    loss.sum().backward()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="KD needs the same"):
        kd_loss(student, teacher[:, :4])


def test_feature_loss_with_identity_projector_is_the_feature_mse():
    gen = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 5, 6, generator=gen, requires_grad=True) for _ in range(2)]
    ft = [torch.randn(2, 5, 6, generator=gen) for _ in range(2)]
    proj = FeatureProjectors(6, 6, 2)
    with torch.no_grad():
        for p in proj:
            p.weight.copy_(torch.eye(6))
    loss = feature_loss(fs, ft, proj)
    expected = torch.stack([(a - b).pow(2).mean((1, 2)) for a, b in zip(fs, ft)]).mean(0)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert all(p.grad is not None for p in proj.parameters()) and fs[0].grad is not None
    with pytest.raises(ValueError, match="1 projectors for 2"):
        feature_loss(fs, ft, FeatureProjectors(6, 6, 1))
    with pytest.raises(ValueError, match="same token grid"):
        feature_loss(fs, [f[:, :4] for f in ft], proj)


def test_self_correlation_ignores_width_rotation_and_token_scale():
    gen = torch.Generator().manual_seed(1)
    fs = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 4, generator=gen, dtype=torch.float64))  # (10, 4) orthonormal columns
    scale = torch.rand(3, 7, 1, generator=gen, dtype=torch.float64) + 0.5
    ft = (fs @ q.T) * scale  # a wider teacher whose tokens are a rotation + rescaling of the student's
    assert float(self_correlation_loss([fs], [ft]).abs().max()) < 1e-12
    other = torch.randn(3, 7, 10, generator=gen, dtype=torch.float64)
    assert float(self_correlation_loss([fs], [other]).min()) > 1e-3


def test_self_correlation_hand_computed():
    # Two tokens: student orthogonal (correlation matrix I), teacher parallel (all ones):
    # the off-diagonal entries differ by 1, so the mean squared difference is 2 / 4.
    fs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ft = torch.tensor([[[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    torch.testing.assert_close(self_correlation_loss([fs], [ft]), torch.tensor([0.5]))


def test_block_output_hooks_record_in_order_and_clean_up():
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                         num_classes=10).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.no_grad(), capture_block_outputs(model, [0, 2]) as feats:
        model(x, t, y)
    assert [f.shape for f in feats] == [torch.Size([2, 4, 32])] * 2
    # Oracle: run the blocks by hand and compare with what the hooks saw.
    seen = []
    handle = model.blocks[2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(x, t, y)
    handle.remove()
    torch.testing.assert_close(feats[1], seen[0])
    with pytest.raises(RuntimeError, match="boom"):
        with capture_block_outputs(model, [1]):
            raise RuntimeError("boom")
    assert all(not b._forward_hooks for b in model.blocks)
