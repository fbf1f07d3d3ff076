"""Exact conversion between this package's :class:`DiT` and diffusers' ``DiTTransformer2DModel``.

``from_diffusers_model(transformer)`` and ``to_diffusers(dit)`` compute the same function up to
float32 rounding: ``dit(x, t, y) == transformer(x, timestep=t, class_labels=y).sample``. This
module converts models in memory only; reading one from a folder or Hub id is
:func:`shd_diffusion.models.sources.from_diffusers`. Facts behind the
mapping (read from diffusers' DiT and its conversion script, written here from scratch):

- diffusers splits the fused ``qkv`` into ``attn1.to_q/to_k/to_v``; ``attn.proj`` is
  ``attn1.to_out.0``; the MLP is ``ff.net.0.proj`` / ``ff.net.2``; the block adaLN is
  ``norm1.linear``; the final adaLN and linear are ``proj_out_1`` / ``proj_out_2``.
- Every block owns a copy of the timestep and label embedders (``norm1.emb``); the converted
  checkpoints hold identical copies and the final layer uses block 0's. A model whose copies
  differ has no single-embedder equivalent and is refused.
- The timestep features use ``downscale_freq_shift=1`` and the MLP LayerNorm uses ``norm_eps``;
  :class:`DiT` has both as config (``freq_shift``, ``mlp_norm_eps``). A DiT with the original
  ``freq_shift=0`` exports as :class:`DiTTransformer2DModelFreqShift`.
- The sin-cos position table is a non-persistent buffer that diffusers recomputes on load; it is
  copied across on conversion (after a save/load round trip diffusers' own table is used, which
  agrees with this package's to float32 rounding).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DiTTransformer2DModel

from shd_diffusion.models.dit import DiT
from shd_diffusion.models.dit_transformer_freq_shift import DiTTransformer2DModelFreqShift
from shd_diffusion.models.loading import WeightsError

__all__ = ["DIFFUSERS_DIT_CLASSES", "dit_kwargs_from_diffusers_config", "from_diffusers_model", "to_diffusers"]

# Classes whose folders this module converts (``_class_name`` in config.json).
DIFFUSERS_DIT_CLASSES = {cls.__name__: cls for cls in (DiTTransformer2DModel, DiTTransformer2DModelFreqShift)}
DIFFUSERS_FREQ_SHIFT = 1  # DiTTransformer2DModel's hard-coded downscale_freq_shift
DIFFUSERS_LABEL_DROPOUT = 0.1  # hard-coded in diffusers (CombinedTimestepLabelEmbeddings): always a null row
_EMB = "norm1.emb."  # per-block embedder prefix in diffusers
# (diffusers suffix, DiT suffix) inside each block, besides the fused qkv.
_BLOCK_KEYS = (
    ("norm1.linear", "adaLN_modulation.1"),
    ("attn1.to_out.0", "attn.proj"),
    ("ff.net.0.proj", "mlp.fc1"),
    ("ff.net.2", "mlp.fc2"),
)
# (diffusers name, DiT name) outside the blocks; the embedders are block 0's copies.
_TOP_KEYS = (
    ("pos_embed.proj", "x_embedder.proj"),
    ("transformer_blocks.0." + _EMB + "timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("transformer_blocks.0." + _EMB + "timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("proj_out_1", "final_layer.adaLN_modulation.1"),
    ("proj_out_2", "final_layer.linear"),
)
_LABEL_TABLE = ("transformer_blocks.0." + _EMB + "class_embedder.embedding_table.weight", "y_embedder.embedding_table.weight")


def dit_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`DiT` constructor keywords equivalent to a ``DiTTransformer2DModel`` config.

    Raises:
        WeightsError: a setting :class:`DiT` cannot reproduce (named, with its value).
    """
    required = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True}
    for key, want in required.items():
        if config.get(key, want) != want:
            raise WeightsError(f"diffusers DiT config has {key}={config[key]!r}; only {want!r} converts to DiT")
    if config.get("num_embeds_ada_norm") is None:
        raise WeightsError("diffusers DiT config has num_embeds_ada_norm=None: not class-conditional, no DiT equivalent")
    heads, in_ch = int(config["num_attention_heads"]), int(config["in_channels"])
    out_ch = int(config.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise WeightsError(f"diffusers DiT config has out_channels={out_ch} for in_channels={in_ch}: expected {in_ch} or {2 * in_ch}")
    return {
        "input_size": int(config["sample_size"]),
        "patch_size": int(config["patch_size"]),
        "in_channels": in_ch,
        "hidden_size": heads * int(config["attention_head_dim"]),
        "depth": int(config["num_layers"]),
        "num_heads": heads,
        "mlp_ratio": 4.0,  # FeedForward's default mult; DiT's config has no other
        "class_dropout_prob": DIFFUSERS_LABEL_DROPOUT,
        "num_classes": int(config["num_embeds_ada_norm"]),
        "learn_sigma": out_ch == 2 * in_ch,
        "freq_shift": int(config.get("freq_shift", DIFFUSERS_FREQ_SHIFT)),
        "mlp_norm_eps": float(config.get("norm_eps", 1e-5)),
    }


def _check_shared_embedders(state: Mapping[str, torch.Tensor], depth: int) -> None:
    """Every block's timestep/label embedder must equal block 0's (DiT has one)."""
    first = {k[len("transformer_blocks.0." + _EMB) :]: v for k, v in state.items() if k.startswith("transformer_blocks.0." + _EMB)}
    for i in range(1, depth):
        for name, ref in first.items():
            other = state.get(f"transformer_blocks.{i}.{_EMB}{name}")
            if other is None or not torch.equal(other, ref):
                raise WeightsError(
                    f"diffusers DiT block {i} has its own {_EMB}{name} (differs from block 0's): DiT shares one timestep "
                    "and label embedder, so this model has no exact DiT equivalent"
                )


def _dit_state(transformer: DiTTransformer2DModel, depth: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state dict to :class:`DiT` names (every key used exactly once)."""
    state = transformer.state_dict()
    _check_shared_embedders(state, depth)
    out: dict[str, torch.Tensor] = {"pos_embed": transformer.pos_embed.pos_embed.detach().clone()}  # (1, N, D) buffer
    used = set()
    pairs = [(f"{a}.{p}", f"{b}.{p}") for a, b in _TOP_KEYS for p in ("weight", "bias")] + [_LABEL_TABLE]
    for i in range(depth):
        pre, new = f"transformer_blocks.{i}.", f"blocks.{i}."
        pairs += [(f"{pre}{a}.{p}", f"{new}{b}.{p}") for a, b in _BLOCK_KEYS for p in ("weight", "bias")]
        for p in ("weight", "bias"):
            parts = [f"{pre}attn1.to_{n}.{p}" for n in "qkv"]
            out[f"{new}attn.qkv.{p}"] = torch.cat([state[k] for k in parts])  # (3D, D) / (3D,)
            used.update(parts)
        used.update(k for k in state if k.startswith(pre + _EMB))  # the shared copies, checked above
    for src, dst in pairs:
        out[dst] = state[src]
        used.add(src)
    left = sorted(set(state) - used)
    if left:
        raise WeightsError(f"diffusers DiT has weights DiT has no place for: {', '.join(left[:5])}")
    return out


def from_diffusers_model(transformer: DiTTransformer2DModel) -> DiT:
    """Convert a diffusers ``DiTTransformer2DModel`` (or the freq-shift subclass) to a :class:`DiT`.

    Args:
        transformer: the diffusers model.

    Returns:
        A float32 :class:`DiT` in eval mode whose forward equals the transformer's.

    Raises:
        WeightsError: a setting or weight layout DiT cannot reproduce.
    """
    kwargs = dit_kwargs_from_diffusers_config(transformer.config)
    dit = DiT(**kwargs)
    state = _dit_state(transformer, kwargs["depth"])
    dit.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return dit.eval()


def to_diffusers(dit: DiT) -> DiTTransformer2DModel:
    """Convert a :class:`DiT` to an equivalent diffusers ``DiTTransformer2DModel``.

    A DiT with diffusers' timestep features (``freq_shift=1``) becomes the plain class; one with
    the original DiT features becomes :class:`DiTTransformer2DModelFreqShift` (a subclass).

    Raises:
        WeightsError: a DiT that the diffusers class cannot express (MLP ratio, no null class).
    """
    cfg = dit.config
    if float(cfg.mlp_ratio) != 4.0:
        raise WeightsError(f"DiT has mlp_ratio={cfg.mlp_ratio}; DiTTransformer2DModel's MLP is 4x wide")
    if float(cfg.class_dropout_prob) <= 0:
        raise WeightsError("DiT has no null class (class_dropout_prob=0); DiTTransformer2DModel always has one")
    common = dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=dit.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=float(getattr(cfg, "mlp_norm_eps", 1e-6)),
    )
    shift = int(getattr(cfg, "freq_shift", 0))
    if shift == DIFFUSERS_FREQ_SHIFT:
        transformer: DiTTransformer2DModel = DiTTransformer2DModel(**common)
    else:
        transformer = DiTTransformer2DModelFreqShift(**common, freq_shift=shift)
    ours = {k: v.detach().float() for k, v in dit.state_dict().items()}
    state = {}
    for src, dst in [(f"{a}.{p}", f"{b}.{p}") for a, b in _TOP_KEYS for p in ("weight", "bias")] + [_LABEL_TABLE]:
        state[src] = ours[dst]
    for i in range(cfg.depth):
        pre, new = f"transformer_blocks.{i}.", f"blocks.{i}."
        for a, b in _BLOCK_KEYS:
            for p in ("weight", "bias"):
                state[f"{pre}{a}.{p}"] = ours[f"{new}{b}.{p}"]
        for p in ("weight", "bias"):
            for n, part in zip("qkv", ours[f"{new}attn.qkv.{p}"].chunk(3)):  # each (D, D) / (D,)
                state[f"{pre}attn1.to_{n}.{p}"] = part
        if i:  # every block holds a copy of the shared embedders
            first = [k for k in state if k.startswith("transformer_blocks.0." + _EMB)]
            state.update({pre + k[len("transformer_blocks.0.") :]: state[k] for k in first})
    transformer.load_state_dict(state, strict=True)
    transformer.pos_embed.pos_embed.copy_(ours["pos_embed"])
    return transformer.eval()

