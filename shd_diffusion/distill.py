"""Distillation terms other than SHD: output KD, feature distillation, self-correlation.

Every loss returns per-sample values (B,); the training loop weights, reduces and logs them.
SHD itself (squeezing + map loss) lives in :mod:`shd_diffusion.shd`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .attention import attention_layers

__all__ = ["kd_loss", "feature_loss", "self_correlation_loss", "capture_block_outputs", "FeatureProjectors"]


def kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """The paper's "simple KD": mean squared error between student and teacher outputs.

    Both outputs hold eps and (with learned sigma) the variance-interpolation channels; all
    channels are matched, so the student also inherits the teacher's variance.

    Args:
        student_out: (B, C, H, W) student prediction (with graph).
        teacher_out: (B, C, H, W) teacher prediction (no graph).

    Returns:
        (B,) mean over C, H, W of the squared difference.
    """
    if student_out.shape != teacher_out.shape:
        raise ValueError(
            f"student output {tuple(student_out.shape)} != teacher output {tuple(teacher_out.shape)}: "
            "KD needs the same in_channels, input_size and learn_sigma"
        )
    diff = student_out.float() - teacher_out.detach().float()
    return diff.pow(2).flatten(1).mean(dim=1)


class FeatureProjectors(nn.ModuleList):
    """One learned linear map per distilled layer, student width -> teacher width.

    Zero bias and a least-squares-friendly init; trained jointly with the student.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int) -> None:
        super().__init__(nn.Linear(student_dim, teacher_dim) for _ in range(num_layers))
        for proj in self:
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)


def feature_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    projectors: FeatureProjectors,
) -> torch.Tensor:
    """Feature distillation with a projector: mean over layers of MSE(P_l(f_s), f_t).

    Args:
        student_feats: per layer (B, N, D_s) student block outputs.
        teacher_feats: per layer (B, N, D_t) teacher block outputs.
        projectors: one Linear(D_s, D_t) per layer.

    Returns:
        (B,) mean over layers, tokens and channels.
    """
    _check_pairs(student_feats, teacher_feats)
    if len(projectors) != len(student_feats):
        raise ValueError(f"{len(projectors)} projectors for {len(student_feats)} distilled layers")
    terms = [
        (proj(fs.float()) - ft.detach().float()).pow(2).flatten(1).mean(dim=1)
        for proj, fs, ft in zip(projectors, student_feats, teacher_feats)
    ]
    return torch.stack(terms).mean(dim=0)


def _token_correlation(feats: torch.Tensor) -> torch.Tensor:
    f = nn.functional.normalize(feats.float(), dim=-1)  # (B, N, D) unit tokens
    return f @ f.transpose(1, 2)  # (B, N, N) cosine similarity between tokens


def self_correlation_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Self-correlation feature distillation (paper eq. 12): match token-token correlations.

    The (N, N) cosine-similarity matrix of each model's tokens is width-independent, so no
    projector is needed. Tokens are L2-normalised first so the scale of the features drops out.

    Args:
        student_feats: per layer (B, N, D_s). teacher_feats: per layer (B, N, D_t).

    Returns:
        (B,) mean over layers and matrix entries of the squared difference.
    """
    _check_pairs(student_feats, teacher_feats)
    terms = [
        (_token_correlation(fs) - _token_correlation(ft.detach())).pow(2).flatten(1).mean(dim=1)
        for fs, ft in zip(student_feats, teacher_feats)
    ]
    return torch.stack(terms).mean(dim=0)


def _check_pairs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need matching non-empty layer lists, got {len(student)} student / {len(teacher)} teacher")
    for i, (fs, ft) in enumerate(zip(student, teacher)):
        if fs.shape[:2] != ft.shape[:2]:
            raise ValueError(
                f"layer pair {i}: student tokens {tuple(fs.shape[:2])} != teacher {tuple(ft.shape[:2])}: "
                "feature distillation needs the same token grid"
            )


def _block_of(model: nn.Module, attn: nn.Module) -> nn.Module:
    for module in model.modules():
        if getattr(module, "attn", None) is attn or getattr(module, "attn1", None) is attn:
            return module
    raise ValueError(f"cannot find the block that owns attention module {type(attn).__name__}")


@contextlib.contextmanager
def capture_block_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Record the (B, N, D) outputs of the transformer blocks owning the given attention layers.

    Layers are indices into :func:`~shd_diffusion.attention.attention_layers` order (execution
    order), as for attention capture. Hooks are removed on exit, also after an exception.

    Yields:
        A list filled with one tensor per hooked block call, in call order.
    """
    modules = attention_layers(model)
    outputs: list[torch.Tensor] = []
    handles = []
    try:
        for i in layers:
            block = _block_of(model, modules[i])
            handles.append(block.register_forward_hook(lambda _m, _i, out: outputs.append(out)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
