"""The MDTv2 family: :class:`~shd_diffusion.models.MDTv2` (sail-sg/MDT).

What differs from the DiT default: every training micro-batch runs a second, masked student pass
(:func:`masked_pass`), the eps MSE is Min-SNR-5 weighted by default, guidance follows the
power-cosine schedule, and the export is a ``ClassConditionalPipeline`` folder around the model's
own ``save_pretrained`` folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..diffusion import GaussianDiffusion
from ..models import MDTv2
from ..objective import per_sample
from .spec import DiffusionBatch, ExportSpec, FamilySpec, TransformerEntry

__all__ = ["MDT", "masked_pass"]


def masked_pass(trained: nn.Module, diffusion: GaussianDiffusion, b: DiffusionBatch) -> dict[str, torch.Tensor]:
    """MDTv2's masked pass: ``{"diffusion_masked": (B,)}``, the diffusion loss on the full image.

    Same t and labels as the main pass, independent noise (as upstream), a random keep set per
    sample (its noise from the sample's generator) and this step's mask-ratio draw.
    """
    dev = b.x0.device
    noise = per_sample(b.gens, lambda g: torch.randn(b.x0.shape[1:], generator=g, device=dev)).to(b.x0.dtype)
    x_t = diffusion.q_sample(b.x0, b.t, noise)  # (B, C, H, W)
    mask_noise = per_sample(b.gens, lambda g: torch.rand(b.num_tokens, generator=g, device=dev))  # (B, N)
    out, _, _ = trained(x_t, b.t, b.y, enable_mask=True, force_drop_ids=b.drop,
                        mask_ratio_draw=b.mask_ratio_draw, mask_noise=mask_noise)
    loss = diffusion.training_losses(out.float(), b.x0, x_t, b.t, noise, mse_weight=b.mse_weight)["loss"]
    return {"diffusion_masked": loss}


def write_transformer(model: nn.Module, folder: Path) -> TransformerEntry:
    """``folder/transformer`` as the model's own ``save_pretrained`` folder (needs this package to load)."""
    model.save_pretrained(folder / "transformer")
    return TransformerEntry(["shd_diffusion.models", "MDTv2"], custom_code=False)


MDT = FamilySpec(
    name="MDTv2",
    model_classes=(MDTv2,),
    default_loss_weighting="min_snr5",  # MDT's Min-SNR-5 on the eps MSE (the VB term stays unweighted)
    extra_pass=masked_pass,
    extra_terms=("diffusion_masked",),
    guidance_schedule="power-cosine",
    export=ExportSpec(write_transformer=write_transformer, scheduler_variance="learned_range"),
)
