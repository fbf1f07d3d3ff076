"""What the text-to-image families share: conditioning, latent packing, layers, tokens, SHD rows.

The per-class attention facts (block stacks, token order, out-projections) stay in one place,
:data:`shd_diffusion.t2i_attention.T2I_SPECS`; :func:`text_family` builds a
:class:`~.spec.FamilySpec` whose layers, token segments and name come from that table entry, so a
family file (:mod:`.pixart`, :mod:`.sd3`, :mod:`.flux`, :mod:`.qwen_image`) only says how its model
is called and which objective trains it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..attention import AttentionStore
from ..data.conditioning import drop_conditioning
from ..t2i_attention import T2I_SPECS
from ..t2i_capture import shd_inputs, t2i_attention_layers
from .spec import FamilySpec, Footprint, TextExportSpec, save_pretrained_model

__all__ = ["TEXT_CFG_DROPOUT", "text_family", "text_condition", "pack_2x2", "unpack_2x2", "grid_ids",
           "sample_tokens", "inner_dim"]

TEXT_CFG_DROPOUT = 0.1  # empty-prompt probability per training sample (student.class_dropout_prob overrides)


def text_condition(cond: Mapping[str, Tensor], drop: Tensor, empty: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """CFG dropout on text: sample i takes the dataset's empty-prompt conditioning where ``drop[i]``.

    Args:
        cond: the batch's conditioning dict of (B, ...) tensors.
        drop: (B,) 0/1, drawn per sample from the sample's generator by the objective.
        empty: the dataset's empty-prompt dict (one sample's shapes).
    """
    if empty is None:
        raise ValueError("text conditioning needs the dataset's empty prompt for CFG dropout (data.kind=text_latents)")
    return drop_conditioning(cond, empty, drop.bool())


def pack_2x2(x: Tensor) -> Tensor:
    """Latents (B, C, H, W) -> a sequence of 2 x 2 patches (B, H/2 * W/2, 4 C), as FLUX / Qwen-Image pipelines pack."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)  # (B, S, 4C), channel-major per patch


def unpack_2x2(seq: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_2x2`: (B, H/2 * W/2, 4 C) -> (B, C, H, W)."""
    b, _, c4 = seq.shape
    x = seq.view(b, height // 2, width // 2, c4 // 4, 2, 2)  # (B, H/2, W/2, C, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, height, width)  # (B, C, H, W)


def grid_ids(rows: int, cols: int, device: torch.device) -> Tensor:
    """FLUX's image position ids (rows * cols, 3): (0, row, column) per packed token, row-major."""
    ids = torch.zeros(rows, cols, 3, device=device)  # (rows, cols, 3)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)  # (S, 3)


def inner_dim(model: nn.Module) -> int:
    """The attention width: heads x head_dim (the residual width of these transformers)."""
    return int(model.config.num_attention_heads) * int(model.config.attention_head_dim)


def sample_tokens(model: nn.Module) -> int:
    """Image tokens at the model's configured ``sample_size`` (PixArt, SD3), or 0 where the grid follows the data."""
    size = model.config.get("sample_size") if hasattr(model.config, "get") else None
    if size is None or not hasattr(model.config, "patch_size"):
        return 0
    return (int(size) // int(model.config.patch_size)) ** 2


def _layers(model: nn.Module) -> list[nn.Module]:
    """The self- and joint-attention modules, numbered as :func:`~shd_diffusion.t2i_capture.capture_t2i_qk` numbers them."""
    return [site.module for site in t2i_attention_layers(model)]


def _footprint(model: nn.Module) -> Footprint:
    """Width heads x head_dim, one block per attention layer, input values at the configured size (0 if unknown)."""
    cfg = model.config
    side = cfg.get("sample_size") if hasattr(cfg, "get") else None
    image = int(cfg.in_channels) * int(side) ** 2 if side else 0
    return Footprint(inner_dim(model), len(_layers(model)), image)


def _image_rows(teacher: AttentionStore, ti: int, student: AttentionStore, si: int, keys: str = "all") -> dict[str, Any]:
    """SHD on the image-query rows (:func:`~shd_diffusion.t2i_capture.shd_inputs`), as ``shd_term`` keywords."""
    return shd_inputs(teacher, ti, student, si, keys=keys)._asdict()


def _latent_problems(latent_channels: Callable[[nn.Module], int], even_grid: bool, text_width: str,
                     pooled_width: str | None, cond_keys: tuple[str, ...]) -> Callable[[nn.Module, Any, int, int], list[str]]:
    """A ``data_problems`` check: latent channels, grid, and the stored conditioning's keys and widths."""

    def problems(model: nn.Module, dataset: Any, channels: int, side: int) -> list[str]:
        cfg, out = model.config, []
        if channels != latent_channels(model):
            out.append(f"{channels} latent channels but the model takes {latent_channels(model)}")
        if even_grid and side % 2:
            out.append(f"a {side} x {side} latent grid, which 2 x 2 packing cannot split (use an even size)")
        spec = getattr(dataset, "cond_spec", None)
        if spec is None:
            return out + ["no text conditioning (data.kind must be text_latents)"]
        missing = [k for k in cond_keys if k not in spec]
        if missing:
            out.append(f"conditioning without {', '.join(missing)} (stored: {', '.join(spec)})")
        widths = [("prompt_embeds", text_width), ("pooled_prompt_embeds", pooled_width)]
        for key, field in widths:
            if field and key in spec and spec[key]["shape"][-1] != int(cfg[field]):
                out.append(f"{key} of width {spec[key]['shape'][-1]} but the model's {field} is {cfg[field]}")
        return out

    return problems


def text_family(model_class: type, *, forward: Callable[..., Tensor], cond_keys: tuple[str, ...],
                latent_channels: Callable[[nn.Module], int], packed: bool, text_width: str,
                pooled_width: str | None = None, export_note: str = "", **fields: Any) -> FamilySpec:
    """A text-to-image :class:`~.spec.FamilySpec` whose attention facts come from the one table.

    Args:
        model_class: the diffusers transformer class (its :data:`~shd_diffusion.t2i_attention.T2I_SPECS` entry
            gives the family name, the distilled layers and the token order).
        forward: (model, x_t (B, C, H, W), timestep (B,), cond dict) -> output (B, C_out, H, W).
        cond_keys: conditioning keys the model needs.
        latent_channels: the latent channels C the model reads.
        packed: the model reads 2 x 2 packed latents (the grid must be even).
        text_width, pooled_width: config fields the stored embedding widths must equal.
        **fields: the remaining :class:`~.spec.FamilySpec` fields (objective, flow, learn_sigma, ...).
    """
    entry = T2I_SPECS[model_class.__name__]
    return FamilySpec(
        name=entry.family,
        model_classes=(model_class,),
        conditioning="text",
        null_class=lambda model: -1,  # no null class: CFG's unconditional half is the empty prompt
        label_dropout=lambda model: TEXT_CFG_DROPOUT,
        condition=text_condition,
        forward=forward,
        cond_keys=cond_keys,
        data_problems=_latent_problems(latent_channels, packed, text_width, pooled_width, cond_keys),
        footprint=_footprint,
        attention_layers=_layers,
        token_segments=entry.stacks[0].sites[0].order,
        num_tokens=sample_tokens,
        shd_inputs=_image_rows,
        cross_attention=any(site.cross for stack in entry.stacks for site in stack.sites),
        feature_distillation=False,
        export=TextExportSpec(write_model=save_pretrained_model, card_note=export_note),
        **fields,
    )
