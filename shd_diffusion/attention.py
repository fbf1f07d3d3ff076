"""Attention processors: a fused fast path, and a capture path that exports per-head maps.

The processors follow diffusers' attention-processor protocol: a processor is a callable
``processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs)``
held by an attention module and swapped with ``module.set_processor(p)``. They therefore work on
this package's :class:`Attention` (timm layout: ``qkv``, ``proj``) and on diffusers' ``Attention``
(``to_q``/``to_k``/``to_v``/``to_out``), e.g. inside ``DiTTransformer2DModel``.

``attention_mask`` is an *additive* bias on the attention logits (MDT's relative-position bias),
a 4-D float tensor broadcastable to (B, H, N, M). Nothing is captured by monkey-patching: the
capture contexts swap processors in and restore the originals on exit, also when the body raises.

Two captures:
- :func:`capture_qk` (training): records what the maps are made from -- q, k (and for a teacher
  v and the out-projection weight) at the model's own precision, and the additive bias once per
  layer -- while the forward stays on fused SDPA (:class:`QKCaptureProcessor`). The output and
  its gradients are those of :class:`SDPAProcessor`. SHD then recomputes the maps block by block
  (:func:`shd_diffusion.shd.shd_term`), so nothing of size (B, H, N, N) is ever stored.
- :func:`capture_attention` (figures, analysis): exports the (B, H, N, M) maps themselves
  (:class:`CaptureProcessor`, explicit softmax).

Precision: exported maps are float32, or float64 for a float64 model
(:func:`shd_diffusion.precision.compute_dtype`). Their logits and softmax run with autocast
disabled, because under ``torch.autocast`` even ``q.float() @ k.float()`` is cast back down to
bf16/fp16. The projections (and so q, k, v) keep whatever precision the caller runs in.

diffusers' text-to-image transformers (PixArt, SD3, FLUX.1/2, Qwen-Image) keep their own processors:
:func:`capture_qk` hands them to :mod:`shd_diffusion.t2i_capture`, which records at the attention
kernel; other diffusers classes except DiT are refused (:func:`~shd_diffusion.t2i_attention.t2i_spec`).

Unsupported diffusers features (joint attention with ``add_k_proj``/``add_v_proj``, spatial or
group norms, 2-D/3-D diffusers-style masks) raise ``NotImplementedError`` instead of being ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shd_diffusion.precision import compute_dtype
from shd_diffusion.t2i_attention import t2i_spec

__all__ = [
    "Attention",
    "SDPAProcessor",
    "CaptureProcessor",
    "QKCaptureProcessor",
    "AttentionStore",
    "Segment",
    "attention_layers",
    "capture_attention",
    "capture_qk",
    "attention_probs",
    "require_no_grad",
]


# --------------------------------------------------------------------------------------------
# Module-layout adapters: one place that knows both the timm and the diffusers parameter names.
# --------------------------------------------------------------------------------------------


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, d)


def project_qkv(
    attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head queries, keys and values of ``attn`` for ``hidden_states``.

    Args:
        attn: this package's :class:`Attention` (fused ``qkv``) or a diffusers ``Attention``.
        hidden_states: (B, N, D) tokens.
        encoder_hidden_states: (B, M, D_enc) context for cross-attention (diffusers modules only).

    Returns:
        q (B, H, N, d), k (B, H, M, d), v (B, H, M, d).
    """
    if hidden_states.ndim != 3:
        raise ValueError(
            f"attention processors expect (B, N, D) tokens, got shape {tuple(hidden_states.shape)}"
        )
    heads = attn.heads
    if hasattr(attn, "qkv"):
        if encoder_hidden_states is not None:
            raise ValueError("shd_diffusion.Attention is self-attention only; got encoder_hidden_states")
        b, n, c = hidden_states.shape
        qkv = attn.qkv(hidden_states).view(b, n, 3, heads, c // heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        return q, k, v
    # diffusers layout. Refuse what these processors would otherwise silently skip.
    for unsupported in ("spatial_norm", "group_norm"):
        if getattr(attn, unsupported, None) is not None:
            raise NotImplementedError(f"attention module uses `{unsupported}`, which these processors do not support")
    joint = [name for name in ("add_q_proj", "add_k_proj", "add_v_proj") if getattr(attn, name, None) is not None]
    if joint:
        raise NotImplementedError(
            f"attention module has {', '.join(joint)} (joint/added-KV attention, e.g. SD3/Flux/UniDiffuser): "
            "these processors implement plain self-/cross-attention only; keep diffusers' own processor there"
        )
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and getattr(attn, "norm_cross", None) is not None:
        context = attn.norm_encoder_hidden_states(context)
    q = _split_heads(attn.to_q(hidden_states), heads)  # (B, H, N, d)
    k = _split_heads(attn.to_k(context), heads)  # (B, H, M, d)
    v = _split_heads(attn.to_v(context), heads)  # (B, H, M, d)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k, v


def output_projection(attn: nn.Module) -> nn.Linear:
    """The out-projection ``nn.Linear`` whose weight (D, H*d) mixes the heads back."""
    return attn.proj if hasattr(attn, "proj") else attn.to_out[0]


def _finish(attn: nn.Module, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Merge heads, project, and apply the module's output-side options."""
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, D)
    out = output_projection(attn)(out)
    if hasattr(attn, "proj"):
        drop = getattr(attn, "proj_drop", None)
        return drop(out) if drop is not None else out
    out = attn.to_out[1](out)  # dropout
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def _scale(attn: nn.Module, head_dim: int) -> float:
    return float(getattr(attn, "scale", head_dim**-0.5))


def _logits_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive logit bias in ``dtype``, after checking it is one these processors understand."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        raise TypeError("attention_mask must be an additive float bias, not a boolean mask")
    if attention_mask.ndim != 4:
        # diffusers callers pass (B, M) / (B, 1, M) key masks or (B*heads, N, M) prepared masks;
        # broadcasting those against (B, H, N, M) would silently mix up batch and heads.
        raise NotImplementedError(
            f"attention_mask of shape {tuple(attention_mask.shape)} is not supported: these processors take "
            "a 4-D additive logit bias broadcastable to (B, heads, N, M); diffusers-style 2-D/3-D masks are not"
        )
    return attention_mask.to(dtype)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _map_logits(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``q k^T * scale + bias`` in float32 (float64 for float64 q, k); call with autocast disabled.

    See :func:`_autocast_off`.
    """
    dtype = compute_dtype(q, k)
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale  # (B, H, N, M)
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Explicit ``softmax((q k^T * scale + bias) / temperature)`` in float32 (float64 for float64 q, k).

    Also under autocast.

    Args:
        q: (B, H, N, d) queries. k: (B, H, M, d) keys.
        scale: logit scale, normally 1/sqrt(d).
        bias: additive logit bias broadcastable to (B, H, N, M), or None.
        temperature: T_a >= 1 softens the distribution (paper eq. 10).

    Returns:
        (B, H, N, M) probabilities, float32 or float64; each row sums to 1.
    """
    with _autocast_off(q.device):
        logits = _map_logits(q, k, scale, bias)  # (B, H, N, M)
        if temperature != 1.0:
            logits = logits / temperature
        return logits.softmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


class SDPAProcessor:
    """Fast path: fused ``scaled_dot_product_attention``; never materialises the maps.

    The additive bias is cast to the dtype of q (bf16 under bf16 autocast): CUDA's fused
    memory-efficient kernel, the one that takes a bias, rejects a bias of another dtype ("invalid
    dtype for bias"), and rounding the bias to bf16 costs no more than the bf16 rounding of q and
    k that enter the same logits. The fused CUDA kernels accumulate logits and softmax in float32.
    Maps in float32 (or float64) come from :class:`CaptureProcessor`.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        bias = _logits_bias(attention_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=_scale(attn, q.shape[-1]))  # (B, H, N, d)
        return _finish(attn, out, hidden_states)


class Segment(NamedTuple):
    """One run of query rows of a captured entry that shares an out-projection (text-to-image models).

    Attributes:
        name: "image" or "text".
        rows: the segment's query rows in the entry's token order (a slice of the S rows).
        out_weight: (D, H*d) the weight, ``nn.Linear`` layout, that maps these rows' merged heads
            into the residual stream (detached); None where the rows have no out-projection
            (SD3's last block discards its text rows).
    """

    name: str
    rows: slice
    out_weight: torch.Tensor | None


@dataclass
class AttentionStore:
    """What :class:`CaptureProcessor` exports, one list entry per captured layer call.

    All exported tensors are float32 (float64 for a float64 model), whatever the autocast state.

    Attributes:
        maps: (B, H, N, M) probabilities at the capture temperature T_a. For a student they keep
            their autograd graph; for a teacher (``export_values=True``) they are detached.
        probs: (B, H, N, M) probabilities at T = 1 (the same tensors as ``maps`` when T_a == 1).
            Squeezing computes alpha from these (alpha preserves the teacher's real output).
        values: (B, H, M, d) per-head values (teacher capture only). Upcast copies of the values
            the layer actually used: under autocast they carry the projection's bf16 rounding.
        out_weights: (D, H*d) out-projection weights in ``nn.Linear.weight`` layout (teacher only).
        outputs: (B, H, N, d) per-head attention outputs ``A_i V_i`` before the out-projection,
            as the layer computed them (teacher only; they spare squeezing a product).
        queries, keys: (B, H, N, d) per-head queries and keys, :func:`capture_qk` only, at the
            model's precision (bf16 under bf16 autocast), scaled so that the logits are
            ``q k^T / sqrt(d)``; a student's keep their graph, a teacher's are detached.
        biases: the additive logit bias each layer used, or None: MDT's relative-position bias as
            (1, H, N, N), once per layer and shared by the batch (:func:`capture_qk` only).
        layer_indices: index of each entry's layer in :func:`attention_layers` order (text-to-image
            models: in :func:`shd_diffusion.t2i_capture.t2i_attention_layers` order).
        segments: per entry, the :class:`Segment` runs of its query rows, text-to-image models only
            (:mod:`shd_diffusion.t2i_capture`); there ``out_weights`` holds the image segment's weight.

    :func:`capture_qk` fills ``values`` and ``outputs`` (at the model's precision, not upcast)
    and ``out_weights`` for a teacher, and never ``maps`` or ``probs``.
    """

    maps: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    out_weights: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    queries: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    biases: list[torch.Tensor | None] = field(default_factory=list)
    layer_indices: list[int] = field(default_factory=list)
    segments: list[list[Segment]] = field(default_factory=list)

    def clear(self) -> None:
        """Drop everything captured so far (e.g. between two forwards in one context)."""
        for entries in (self.maps, self.probs, self.values, self.out_weights, self.outputs, self.queries,
                        self.keys, self.biases, self.layer_indices, self.segments):
            entries.clear()


class CaptureProcessor:
    """Attention that also records its per-head probabilities into an :class:`AttentionStore`.

    Logits and softmax are computed in float32 (float64 for a float64 model) with autocast
    disabled, so the maps are float32 even under bf16 autocast. The module output is computed from the same probabilities at T = 1
    (cast to the dtype of v), so it equals the fused path up to float rounding; the temperature
    only affects what is exported.

    Args:
        store: where maps are appended.
        layer_index: this layer's position in :func:`attention_layers` order.
        temperature: T_a for the exported maps (paper eq. 10); the module output ignores it.
        export_values: teacher mode: also export values and W_out, all detached. Must run with
            gradients disabled (``torch.no_grad()``/``torch.inference_mode()``): a teacher forward
            that records a graph wastes the memory of a second training step, so it is an error.
    """

    def __init__(
        self, store: AttentionStore, layer_index: int, temperature: float = 1.0, export_values: bool = False
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"attention temperature must be > 0, got {temperature}")
        self.store = store
        self.layer_index = layer_index
        self.temperature = float(temperature)
        self.export_values = export_values

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        require_no_grad(self.export_values, "capture_attention")
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        dtype = compute_dtype(q, k)
        bias = _logits_bias(attention_mask, dtype)
        scale = _scale(attn, q.shape[-1])
        with _autocast_off(q.device):
            logits = _map_logits(q, k, scale, bias)  # (B, H, N, M) in dtype
            probs = logits.softmax(dim=-1)  # (B, H, N, M), T = 1: drives the module output
            soft = probs if self.temperature == 1.0 else (logits / self.temperature).softmax(dim=-1)
        out = probs.to(v.dtype) @ v  # (B, H, N, d), in the precision the projections ran in

        store = self.store
        if self.export_values:
            store.maps.append(soft.detach())
            store.probs.append(probs.detach())
            store.values.append(v.detach().to(dtype))
            store.out_weights.append(output_projection(attn).weight.detach().to(dtype))
            store.outputs.append(out.detach().to(dtype))
        else:
            store.maps.append(soft)
            store.probs.append(probs)
        store.layer_indices.append(self.layer_index)
        return _finish(attn, out, hidden_states)

    def scratch(self) -> "CaptureProcessor":
        """The same processor writing into a throwaway store (gradient-checkpoint recomputation)."""
        return CaptureProcessor(AttentionStore(), self.layer_index, self.temperature, self.export_values)


def require_no_grad(export_values: bool, context: str) -> None:
    """Refuse a teacher capture under autograd: its graph would cost a second training step's memory."""
    if export_values and torch.is_grad_enabled():
        raise RuntimeError(
            f"teacher capture ({context}(..., export_values=True)) must run without autograd: "
            "wrap the teacher forward in `with torch.no_grad():`"
        )


class QKCaptureProcessor:
    """Fused SDPA attention that also records q, k (and for a teacher v, W_out) and the bias.

    The module output is computed exactly as :class:`SDPAProcessor` computes it, from the same
    q, k, v, so outputs and gradients are unchanged; the recorded q, k are those very tensors
    (a student's carry their graph, so a loss on them reaches the parameters). Only when a
    module's ``scale`` is not 1/sqrt(d) is the recorded q rescaled so that q k^T / sqrt(d) are the
    layer's logits.

    Args:
        store: where entries are appended (``queries``, ``keys``, ``biases``, ``layer_indices``;
            teacher: also ``values``, ``outputs`` and ``out_weights``).
        layer_index: this layer's position in :func:`attention_layers` order.
        export_values: teacher mode: record detached tensors, v and W_out too; must run without
            autograd (a teacher graph would cost a second training step's memory).
    """

    def __init__(self, store: AttentionStore, layer_index: int, export_values: bool = False) -> None:
        self.store = store
        self.layer_index = layer_index
        self.export_values = export_values

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        require_no_grad(self.export_values, "capture_qk")
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        scale = _scale(attn, q.shape[-1])
        bias = _logits_bias(attention_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, N, d)
        rescale = scale * q.shape[-1] ** 0.5
        q_rec = q if rescale == 1.0 else q * rescale  # logits = q_rec k^T / sqrt(d)
        store = self.store
        if self.export_values:
            store.queries.append(q_rec.detach())
            store.keys.append(k.detach())
            store.values.append(v.detach())
            store.out_weights.append(output_projection(attn).weight.detach())
            store.outputs.append(out.detach())  # A_i V_i per head, as the fused kernel computed them
            store.biases.append(None if attention_mask is None else attention_mask.detach())
        else:
            store.queries.append(q_rec)
            store.keys.append(k)
            store.biases.append(attention_mask)
        store.layer_indices.append(self.layer_index)
        return _finish(attn, out, hidden_states)

    def scratch(self) -> "QKCaptureProcessor":
        """The same processor writing into a throwaway store (gradient-checkpoint recomputation)."""
        return QKCaptureProcessor(AttentionStore(), self.layer_index, self.export_values)


# --------------------------------------------------------------------------------------------
# The module used by this package's models
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter layout (``qkv``, ``proj``).

    The math lives in the processor, so official DiT/MDT checkpoints load unchanged while the
    attention computation can be swapped (fast SDPA, or map capture for distillation).

    Args:
        dim: model width D. num_heads: H (D must be divisible by H). qkv_bias: bias on ``qkv``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.processor: object = SDPAProcessor()

    def set_processor(self, processor: object) -> None:
        """Swap how attention is computed (diffusers' protocol)."""
        self.processor = processor

    def attention_bias(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """Additive logit bias; none for plain attention (MDT overrides this)."""
        return None

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the tokens ``x`` through the current processor.

        Args:
            x: (B, K, D) tokens: all K = N of them, or the K kept ones of a masked pass.
            ids_keep: (B, K) original indices of the kept tokens (selects their bias entries),
                or None when all N tokens are present.

        Returns:
            (B, K, D) attention output.
        """
        return self.processor(self, x, attention_mask=self.attention_bias(ids_keep))


# --------------------------------------------------------------------------------------------
# Capture context
# --------------------------------------------------------------------------------------------


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in execution order of its (unmasked) forward.

    Models of this package define ``attention_layers()``; for others (diffusers' DiT) the modules
    that take processors are listed in registration order, which is execution order there.
    """
    own = getattr(model, "attention_layers", None)
    if callable(own):
        return list(own())
    return [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    temperature: float = 1.0,
    layers: Sequence[int] | None = None,
    export_values: bool = False,
) -> Iterator[AttentionStore]:
    """Record per-head attention maps of ``model`` while the context is open.

    ``with capture_attention(model) as store: model(x, t, y)`` leaves ``store.maps`` holding one
    (B, H, N, N) tensor per attention layer, in execution order. Only the selected layers switch
    to the capturing processor; the others keep their fast path. All original processors are
    restored on exit, also when the body raises.

    Args:
        model: a model of this package or a diffusers model built from ``Attention`` modules.
        temperature: T_a of the exported maps; the model's output is unchanged.
        layers: indices into :func:`attention_layers` order to capture (None = all). Negative
            indices count from the end.
        export_values: teacher mode (see :class:`CaptureProcessor`). The teacher forward must
            run under ``torch.no_grad()``; with gradients enabled the first captured layer raises.

    Yields:
        The :class:`AttentionStore` being filled.
    """
    store = AttentionStore()
    with _swapped(model, layers, lambda i: CaptureProcessor(store, i, temperature, export_values)):
        yield store


def capture_qk(
    model: nn.Module, layers: Sequence[int] | None = None, export_values: bool = False, *,
    cross_attention: bool = False,
) -> contextlib.AbstractContextManager[AttentionStore]:
    """Record q, k (teacher: also v, W_out) and the bias of the selected layers; forward stays fused.

    ``with capture_qk(student, layers) as s: student(x_t, t, y)`` leaves ``s.queries[i]``,
    ``s.keys[i]`` (B, H, N, d) and ``s.biases[i]`` for the i-th captured call, in execution order;
    the model's output and gradients are those of the fused path (:class:`QKCaptureProcessor`).

    diffusers' text-to-image transformers (PixArt, SD3, FLUX.1/2, Qwen-Image) are captured at the
    attention kernel instead, with their processors untouched (:mod:`shd_diffusion.t2i_capture`);
    other diffusers classes except DiT are refused with the list of supported ones.

    Args:
        model: a model of this package, diffusers' DiT, or a supported text-to-image transformer.
        layers: indices into :func:`attention_layers` order (None = all; negative from the end);
            text-to-image models: their self- and joint-attention modules in execution order.
        export_values: teacher mode; the forward must run under ``torch.no_grad()``.
        cross_attention: text-to-image models with cross-attention (PixArt's ``attn2``): number and
            record those modules too, in execution order (:func:`shd_diffusion.t2i_capture.capture_t2i_qk`).

    Returns:
        A context manager yielding the :class:`AttentionStore` being filled.

    Raises:
        ValueError: ``cross_attention=True`` for a model captured through its processors (no cross-attention).
    """
    if t2i_spec(model) is not None:
        from shd_diffusion.t2i_capture import capture_t2i_qk  # imports this module: resolved at call time

        return capture_t2i_qk(model, layers, export_values, cross_attention=cross_attention)
    if cross_attention:
        raise ValueError(f"capture_qk(cross_attention=True): {type(model).__name__} has no cross-attention to capture")
    return _capture_qk_processors(model, layers, export_values)


@contextlib.contextmanager
def _capture_qk_processors(
    model: nn.Module, layers: Sequence[int] | None, export_values: bool
) -> Iterator[AttentionStore]:
    """:func:`capture_qk` for this package's models and diffusers' DiT: swap in :class:`QKCaptureProcessor`."""
    store = AttentionStore()
    with _swapped(model, layers, lambda i: QKCaptureProcessor(store, i, export_values)):
        yield store


def select_layers(n: int, layers: Sequence[int] | None) -> list[int]:
    """Sorted distinct indices in range(n) of ``layers`` (None = all; negative count from the end)."""
    if layers is None:
        return list(range(n))
    selected = set()
    for i in layers:
        if not -n <= int(i) < n:
            raise IndexError(f"attention layer {i} out of range: the model has {n} attention layers")
        selected.add(int(i) % n)
    return sorted(selected)


@contextlib.contextmanager
def _swapped(model: nn.Module, layers: Sequence[int] | None, make: Callable[[int], object]) -> Iterator[None]:
    """Give the selected attention layers ``make(index)`` as processor; restore all on exit."""
    modules = attention_layers(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules that accept processors")
    originals = [(m, m.processor) for m in modules]
    try:
        for i in select_layers(len(modules), layers):
            modules[i].set_processor(make(i))
        yield
    finally:
        for m, p in originals:
            m.set_processor(p)
