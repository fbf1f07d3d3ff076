"""Per-class facts about diffusers' text-to-image transformers that SHD's capture needs: one table.

For each supported class (facts of diffusers 0.42.1, ``/work/shared/spec/t2i.md``): which block
lists hold its attention modules, in which execution order, the token order of each module's
query rows, and which ``nn.Linear`` maps each run of query rows into the residual stream. The
mechanism that uses the table lives in :mod:`shd_diffusion.t2i_capture`; nothing here runs code of
the models. Classes are matched by name, so importing this module does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionSite", "BlockStack", "T2IAttentionSpec", "T2I_SPECS", "t2i_spec"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a block.

    Attributes:
        attention: the block's attribute holding the module (a block whose attribute is None,
            e.g. SD3's ``attn2`` outside ``dual_attention_layers``, has no module here).
        order: the query segments ("image"/"text") in the kernel's token order.
        out: per segment, the dotted path from the block to its out-projection ``nn.Linear``;
            a path that ends at None (SD3's last ``to_add_out``) means "no out-projection".
        packed_out: the Linear's input is ``cat[attention, mlp]`` (FLUX single-stream blocks), so
            the attention's W^O is its first H*d input columns.
        cross: cross-attention (image queries, text keys): captured only on request, and never
            in the default layer numbering.
    """

    attention: str
    order: tuple[str, ...]
    out: tuple[str, ...]
    packed_out: bool = False
    cross: bool = False


@dataclass(frozen=True)
class BlockStack:
    """A ``nn.ModuleList`` attribute of the model whose blocks run in list order, with their sites in call order."""

    blocks: str
    sites: tuple[AttentionSite, ...]


@dataclass(frozen=True)
class T2IAttentionSpec:
    """A model class's attention layout: its block stacks in execution order."""

    family: str
    stacks: tuple[BlockStack, ...]


# Joint double-stream attention [text, image] with text rows on `to_add_out` (FLUX.1/2, Qwen-Image).
_TEXT_FIRST_JOINT = AttentionSite("attn", ("text", "image"), ("attn.to_add_out", "attn.to_out.0"))

T2I_SPECS: dict[str, T2IAttentionSpec] = {
    "PixArtTransformer2DModel": T2IAttentionSpec("PixArt", (BlockStack("transformer_blocks", (
        AttentionSite("attn1", ("image",), ("attn1.to_out.0",)),
        AttentionSite("attn2", ("image",), ("attn2.to_out.0",), cross=True),
    )),)),
    "SD3Transformer2DModel": T2IAttentionSpec("SD3", (BlockStack("transformer_blocks", (
        AttentionSite("attn", ("image", "text"), ("attn.to_out.0", "attn.to_add_out")),
        AttentionSite("attn2", ("image",), ("attn2.to_out.0",)),  # SD3.5 dual attention: image self-attention
    )),)),
    "FluxTransformer2DModel": T2IAttentionSpec("FLUX.1", (
        BlockStack("transformer_blocks", (_TEXT_FIRST_JOINT,)),
        BlockStack("single_transformer_blocks", (
            AttentionSite("attn", ("text", "image"), ("proj_out", "proj_out"), packed_out=True),
        )),
    )),
    "Flux2Transformer2DModel": T2IAttentionSpec("FLUX.2", (
        BlockStack("transformer_blocks", (_TEXT_FIRST_JOINT,)),
        BlockStack("single_transformer_blocks", (
            AttentionSite("attn", ("text", "image"), ("attn.to_out", "attn.to_out"), packed_out=True),
        )),
    )),
    "QwenImageTransformer2DModel": T2IAttentionSpec("Qwen-Image", (BlockStack("transformer_blocks", (_TEXT_FIRST_JOINT,)),)),
}

# diffusers classes that take the processor-swap path of shd_diffusion.attention.
_PROCESSOR_PATH = ("DiTTransformer2DModel",)

_REFUSED = {
    "SanaTransformer2DModel": "SANA's self-attention is linear (ReLU kernel): it has no softmax attention map to distil",
}


def _supported() -> str:
    return ", ".join([*T2I_SPECS, *_PROCESSOR_PATH]) + " and this package's models"


def t2i_spec(model: nn.Module) -> T2IAttentionSpec | None:
    """The table entry of ``model``'s class (or of its nearest listed base class), or None.

    None means the processor-swap capture applies (this package's models, diffusers' DiT).

    Raises:
        NotImplementedError: SANA, or any other diffusers model class without an entry.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in T2I_SPECS:
            return T2I_SPECS[cls.__name__]
        if cls.__name__ in _PROCESSOR_PATH:
            return None
    name = type(model).__name__
    if name in _REFUSED:
        raise NotImplementedError(f"{name}: {_REFUSED[name]}; SHD capture supports {_supported()}")
    if type(model).__module__.startswith("diffusers."):
        raise NotImplementedError(f"{name} has no entry in shd_diffusion.t2i_attention.T2I_SPECS; SHD capture supports {_supported()}")
    return None
