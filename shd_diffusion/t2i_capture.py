"""q/k capture for diffusers' text-to-image transformers, recorded at the attention kernel.

Mechanism. These models compute attention inside many different processors (SD3's joint
processor, FLUX's, Qwen-Image's, ...), each with its own QK-norm, RoPE and masks, so swapping
processors would mean re-implementing each. Instead the capture sits where every processor ends:

1. **Who is calling.** A forward pre-hook on each selected attention module sets a context
   variable naming the module (its layer index and table entry, :mod:`shd_diffusion.t2i_attention`);
   the post-hook resets it. A pre-hook on the model reads the caption length from its
   ``encoder_hidden_states`` argument, which splits joint sequences into text and image rows.
2. **What enters the softmax.** While the context is open the kernel entry points are wrapped:
   ``torch.nn.functional.scaled_dot_product_attention`` (PixArt, SD3 call it directly; layout
   (B, H, S, d)) and every function in diffusers' ``_AttentionBackendRegistry._backends`` (FLUX,
   Qwen-Image go through ``dispatch_attention_fn``; layout (B, S, H, d)). A wrapper called while a
   selected module runs records q, k (after QK-norm and RoPE: exactly the kernel's inputs), the
   mask as an additive bias and, for a teacher, v and the kernel's output A_i V_i, then returns
   the original function's result computed from the very same arguments, so outputs and
   gradients are bitwise those of the uncaptured model. No processor is replaced.

Pitfalls handled:
- The native dispatch backend itself calls ``F.scaled_dot_product_attention``: the inner call is
  skipped (a second context variable), or each call would be recorded twice.
- Activation checkpointing re-runs blocks, hooks included, during backward: kernel calls made
  while autograd executes a backward pass are not recorded (the store keeps one entry per call).
  (A backward run after the context has closed never meets the wrappers at all.)
- Boolean masks (Qwen-Image's padded caption, True = attend) become 0 / -inf biases; diffusers'
  2-D (B, S_k) key masks are read as the native backend reads them; PixArt's additive
  cross-attention mask is kept as it is.
- An explicit ``scale=`` is folded into q, so that logits = q k^T / sqrt(d) + bias always.
- Under autocast the kernel casts its inputs (SD3's and FLUX's QK-norms hand it float32 q, k):
  the entry holds q, k, v in the kernel's compute dtype, i.e. what entered the softmax.
- ``enable_gqa``: k and v are recorded with their heads repeated (KV head i // n_rep, as SDPA).
- Wrappers and hooks are removed on exit, also when the body raises; the wrappers are installed
  once for nested captures (teacher and student open together) and removed with the last one.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shd_diffusion.attention import AttentionStore, Segment, require_no_grad, select_layers
from shd_diffusion.t2i_attention import AttentionSite, T2IAttentionSpec, t2i_spec

__all__ = ["CapturedSite", "t2i_attention_layers", "cross_attention_numbering", "capture_t2i_qk", "ShdInputs",
           "shd_inputs", "image_rows", "key_bias"]


# --------------------------------------------------------------------------------------------
# Layers of a model
# --------------------------------------------------------------------------------------------


class CapturedSite(NamedTuple):
    """One attention module in execution order, with its block and table entry."""

    module: nn.Module
    block: nn.Module
    site: AttentionSite


def t2i_attention_layers(model: nn.Module, cross_attention: bool = False) -> list[CapturedSite]:
    """The model's self- and joint-attention modules in execution order (the ``layers`` numbering).

    Args:
        model: a class listed in :data:`~shd_diffusion.t2i_attention.T2I_SPECS`.
        cross_attention: also list cross-attention modules (PixArt's ``attn2``), in their place in
            execution order; this changes the numbering, so it is off by default.
    """
    spec = _require_spec(model)
    sites = []
    for stack in spec.stacks:
        for block in getattr(model, stack.blocks):
            for site in stack.sites:
                module = getattr(block, site.attention, None)
                if module is not None and (cross_attention or not site.cross):
                    sites.append(CapturedSite(module, block, site))
    return sites


def cross_attention_numbering(model: nn.Module) -> list[tuple[int, int | None]]:
    """Where each default-numbered layer and its block's cross-attention sit once cross-attention is numbered.

    Entry j is (index of default layer j, index of the cross-attention module of its block, or None
    where the block has none), both in ``t2i_attention_layers(model, cross_attention=True)`` order:
    PixArt's blocks [attn1, attn2] give [(0, 1), (2, 3), ...]. Pairing layers through this keeps
    self-attention with self-attention and cross with cross when both models are captured with
    ``cross_attention=True``.
    """
    sites = t2i_attention_layers(model, cross_attention=True)
    cross_of = {id(s.block): n for n, s in enumerate(sites) if s.site.cross}  # one cross module per block
    return [(n, cross_of.get(id(s.block))) for n, s in enumerate(sites) if not s.site.cross]


def _require_spec(model: nn.Module) -> T2IAttentionSpec:
    """The table entry of ``model``; models of the processor-swap path are a caller's mistake here."""
    spec = t2i_spec(model)
    if spec is None:
        raise ValueError(f"{type(model).__name__} is not a text-to-image transformer: use shd_diffusion.attention.capture_qk")
    return spec


# --------------------------------------------------------------------------------------------
# Session state and the context variables that route kernel calls to it
# --------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One open capture: where entries go, and the caption length of the current forward."""

    store: AttentionStore
    export_values: bool
    text_len: int | None = None
    tokens: list = field(default_factory=list)  # context-variable tokens of the modules now running


class _Caller(NamedTuple):
    """What a selected module's pre-hook publishes: the session to record into, the layer, its site."""

    session: _Session
    index: int
    site: CapturedSite


_CALLER: ContextVar[_Caller | None] = ContextVar("shd_t2i_caller", default=None)
_IN_DISPATCH: ContextVar[bool] = ContextVar("shd_t2i_in_dispatch", default=False)


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass (checkpoint recomputation runs there)."""
    return torch._C._current_graph_task_id() != -1


def _active_caller() -> _Caller | None:
    """The selected module now calling a kernel, or None when this call must not be recorded."""
    caller = _CALLER.get()
    if caller is None or _IN_DISPATCH.get() or _in_backward():
        return None
    return caller


# --------------------------------------------------------------------------------------------
# Recording one kernel call
# --------------------------------------------------------------------------------------------


def _as_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An SDPA ``attn_mask`` as a 4-D additive bias: boolean True = attend becomes 0, False -inf."""
    if mask is None:
        return None
    if mask.ndim > 4:
        raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)} is not supported (at most 4-D)")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (.., .., S_q or 1, S_k), SDPA broadcasting
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask


def _out_weight(site: CapturedSite, path: str, inner_dim: int) -> Tensor | None:
    """The (D, H*d) out-projection weight at ``path`` from the block, or None where there is none."""
    module: Any = site.block
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    weight = module.weight.detach()
    return weight[:, :inner_dim] if site.site.packed_out else weight  # packed: (D, H*d + mlp) -> (D, H*d)


def _segments(caller: _Caller, rows: int, inner_dim: int) -> list[Segment]:
    """The query-row segments of a call with ``rows`` query rows, in the kernel's token order."""
    order = caller.site.site.order
    if len(order) == 1:
        lengths = [rows]
    else:
        text = caller.session.text_len
        if text is None or text > rows:
            raise RuntimeError(
                f"cannot split {rows} joint tokens into {order}: the model was called without an "
                "`encoder_hidden_states` argument of shape (B, L, D)"
            )
        lengths = [text if name == "text" else rows - text for name in order]
    segments, start = [], 0
    for name, length, path in zip(order, lengths, caller.site.site.out):
        segments.append(Segment(name, slice(start, start + length), _out_weight(caller.site, path, inner_dim)))
        start += length
    return segments


def _record(caller: _Caller, q: Tensor, k: Tensor, v: Tensor, out: Tensor, mask: Tensor | None,
            scale: float | None, enable_gqa: bool) -> None:
    """Append one kernel call's entry; q, k, v, out are (B, H, S, d) (k, v may have fewer heads with GQA)."""
    session = caller.session
    require_no_grad(session.export_values, "capture_qk")
    if out.dtype != q.dtype and torch.is_autocast_enabled(q.device.type):
        # Autocast casts the kernel's inputs itself (QK-norms hand it float32 q, k): record what it used.
        q, k, v = (x.to(out.dtype) for x in (q, k, v))
    if enable_gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S_k, d): KV head i // rep
    d = q.shape[-1]
    if scale is not None and scale * math.sqrt(d) != 1.0:
        q = q * (scale * math.sqrt(d))  # logits = q k^T / sqrt(d)
    bias = _as_bias(mask, q.dtype)
    segments = _segments(caller, q.shape[-2], q.shape[1] * d)
    store = session.store
    if session.export_values:
        q, k, v, out = q.detach(), k.detach(), v.detach(), out.detach()
        bias = None if bias is None else bias.detach()
        image = [s.out_weight for s in segments if s.name == "image"]
        store.values.append(v)
        store.outputs.append(out)  # A_i V_i per head, as the kernel computed them
        store.out_weights.append(image[0] if image else None)
    store.queries.append(q)
    store.keys.append(k)
    store.biases.append(bias)
    store.layer_indices.append(caller.index)
    store.segments.append(segments)


# --------------------------------------------------------------------------------------------
# Kernel wrappers, installed once for all open captures
# --------------------------------------------------------------------------------------------


def _wrap_sdpa(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``F.scaled_dot_product_attention`` that records calls of a selected module (layout B, H, S, d)."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False, **kwargs):
        out = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa, **kwargs)
        caller = _active_caller()
        if caller is not None:
            _check_plain(dropout_p, is_causal)
            _record(caller, query, key, value, out, attn_mask, scale, enable_gqa)
        return out

    return scaled_dot_product_attention


def _wrap_backend(original: Callable[..., Any]) -> Callable[..., Any]:
    """A dispatch backend that records calls of a selected module (layout B, S, H, d).

    ``dispatch_attention_fn`` calls backends with keyword arguments filtered by the *original*
    function's signature (kept in the registry), so the wrapper binds whatever arrives by name.
    """
    signature = inspect.signature(original)

    def backend(*args, **kwargs):
        caller = _active_caller()
        if caller is None:
            return original(*args, **kwargs)
        token = _IN_DISPATCH.set(True)  # the native backend's own F.sdpa call is not a second entry
        try:
            result = original(*args, **kwargs)
        finally:
            _IN_DISPATCH.reset(token)
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        _check_plain(a.get("dropout_p", 0.0), a.get("is_causal", False))
        out = result[0] if isinstance(result, tuple) else result  # (out, lse) with return_lse
        q, k, v = (a[name].transpose(1, 2) for name in ("query", "key", "value"))  # (B, H, S, d)
        mask = a.get("attn_mask")
        if mask is not None and mask.ndim == 2 and mask.shape == (q.shape[0], k.shape[2]):
            mask = mask[:, None, None, :]  # (B, S_k) key mask -> (B, 1, 1, S_k), as the native backend reads it
        out = out.transpose(1, 2)  # (B, S, H, d) -> (B, H, S, d)
        _record(caller, q, k, v, out, mask, a.get("scale"), bool(a.get("enable_gqa", False)))
        return result

    backend.__wrapped__ = original  # type: ignore[attr-defined]
    return backend


def _check_plain(dropout_p: float, is_causal: bool) -> None:
    if dropout_p or is_causal:
        raise NotImplementedError(
            f"attention with dropout_p={dropout_p}, is_causal={is_causal} cannot be rebuilt from q, k and a bias: "
            "capture in eval mode, without causal masking"
        )


class _KernelWrappers:
    """Installs the wrappers when the first capture opens and restores the originals with the last."""

    depth = 0
    sdpa: Callable[..., Tensor] | None = None
    backends: dict = {}

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[None]:
        if cls.depth == 0:
            cls._install()
        cls.depth += 1
        try:
            yield
        finally:
            cls.depth -= 1
            if cls.depth == 0:
                cls._restore()

    @classmethod
    def _install(cls) -> None:
        registry = _backend_registry()
        cls.sdpa = F.scaled_dot_product_attention
        cls.backends = dict(registry)
        F.scaled_dot_product_attention = _wrap_sdpa(cls.sdpa)
        for name, fn in cls.backends.items():
            registry[name] = _wrap_backend(fn)

    @classmethod
    def _restore(cls) -> None:
        F.scaled_dot_product_attention = cls.sdpa
        _backend_registry().update(cls.backends)
        cls.sdpa, cls.backends = None, {}


def _backend_registry() -> dict:
    """diffusers' backend-name -> function dict that ``dispatch_attention_fn`` reads at each call."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends


# --------------------------------------------------------------------------------------------
# The capture context
# --------------------------------------------------------------------------------------------


def _caption_length(session: _Session, forward: Callable[..., Any]) -> Callable[..., None]:
    """A model pre-hook storing ``encoder_hidden_states.shape[1]`` (None when not given)."""
    signature = inspect.signature(forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        text = signature.bind_partial(*args, **kwargs).arguments.get("encoder_hidden_states")
        session.text_len = None if text is None else int(text.shape[1])

    return hook


def _enter_hook(session: _Session, caller: _Caller) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:
        session.tokens.append(_CALLER.set(caller))

    return hook


def _exit_hook(session: _Session) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if session.tokens:
            _CALLER.reset(session.tokens.pop())

    return hook


@contextlib.contextmanager
def capture_t2i_qk(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    export_values: bool = False,
    *,
    cross_attention: bool = False,
) -> Iterator[AttentionStore]:
    """:func:`shd_diffusion.attention.capture_qk` for a text-to-image transformer.

    Entry i of the store holds ``queries[i]``, ``keys[i]`` (B, H, S, d) in the model's own token
    order with logits = q k^T / sqrt(d) + ``biases[i]`` (an additive bias broadcastable to
    (B, H, S_q, S_k), -inf on masked keys, or None), and ``segments[i]``: the named query-row runs
    with their out-projections. Teacher mode adds ``values[i]``, ``outputs[i]`` (A_i V_i, the
    kernel's own output) (B, H, S, d) and ``out_weights[i]`` (the image segment's weight).

    Args:
        model: a class listed in :data:`~shd_diffusion.t2i_attention.T2I_SPECS`.
        layers: indices into :func:`t2i_attention_layers` order (None = all; negative from the end).
        export_values: teacher mode: detached tensors plus v, outputs and out-projections; the
            forward must run under ``torch.no_grad()``.
        cross_attention: number and capture cross-attention modules too (PixArt's ``attn2``).

    Yields:
        The :class:`~shd_diffusion.attention.AttentionStore` being filled.
    """
    sites = t2i_attention_layers(model, cross_attention)
    session = _Session(AttentionStore(), export_values)
    handles = []
    entry = _CALLER.set(None)
    try:
        handles.append(model.register_forward_pre_hook(_caption_length(session, model.forward), with_kwargs=True))
        for i in select_layers(len(sites), layers):
            caller = _Caller(session, i, sites[i])
            handles.append(sites[i].module.register_forward_pre_hook(_enter_hook(session, caller)))
            handles.append(sites[i].module.register_forward_hook(_exit_hook(session)))
        with _KernelWrappers.installed():
            yield session.store
    finally:
        for handle in handles:
            handle.remove()
        _CALLER.reset(entry)


# --------------------------------------------------------------------------------------------
# What SHD takes from a teacher entry and a student entry
# --------------------------------------------------------------------------------------------


class ShdInputs(NamedTuple):
    """Keyword arguments of :func:`shd_diffusion.shd.shd_term` for one layer pair (``**inputs._asdict()``)."""

    student_q: Tensor
    student_k: Tensor
    teacher_q: Tensor
    teacher_k: Tensor
    teacher_v: Tensor
    out_weight: Tensor
    student_bias: Tensor | None
    teacher_bias: Tensor | None
    teacher_out: Tensor | None


def image_rows(segments: Sequence[Segment]) -> Segment:
    """The one ``image`` segment of a capture entry (its rows and out-projection)."""
    found = [s for s in segments if s.name == "image"]
    if len(found) != 1:
        raise ValueError(f"an entry needs exactly one image segment, got {[s.name for s in segments]}")
    return found[0]


def key_bias(bias: Tensor | None, rows: slice, keys: slice) -> Tensor | None:
    """The bias restricted to query ``rows`` (unless row-broadcast) and to ``keys``."""
    if bias is None:
        return None
    bias = bias if bias.shape[-2] == 1 else bias[..., rows, :]  # (.., c or 1, S_k)
    return bias[..., keys]  # (.., c or 1, M)


def shd_inputs(teacher: AttentionStore, t_index: int, student: AttentionStore, s_index: int,
               keys: str = "all") -> ShdInputs:
    """The SHD inputs of a teacher entry and a student entry: image-query rows, per :func:`shd_term`.

    SHD distils the maps of the image queries (their rows go through the image out-projection,
    which alpha needs). The keys are every key of the sequence (default ``keys="all"``: the image
    rows of the joint map, text keys included, with padded caption keys masked by the captured
    bias), or only the image keys (``keys="image"``: the image-image block; its rows no longer sum
    to one over the block, so it is renormalised by the softmax over those keys).

    Args:
        teacher, t_index: a ``capture_qk(..., export_values=True)`` store and an entry index.
        student, s_index: the student's store and entry index (same family, same token counts).
        keys: "all" or "image".

    Returns:
        :class:`ShdInputs`; q rows (B, H, N_img, d), keys and values (B, H, M, d), biases
        broadcastable to (B, H, N_img, M), teacher outputs (B, H_t, N_img, d_t) (None for the image block,
        whose renormalised maps do not produce them), and the teacher's image out-projection (D, H_t d_t).
    """
    if keys not in ("all", "image"):
        raise ValueError(f"keys must be 'all' or 'image', got {keys!r}")
    if not teacher.values:
        raise ValueError("the teacher store has no values: capture the teacher with export_values=True")
    t_img, s_img = image_rows(teacher.segments[t_index]), image_rows(student.segments[s_index])
    if (t_img.rows, teacher.keys[t_index].shape[-2]) != (s_img.rows, student.keys[s_index].shape[-2]):
        raise ValueError(
            f"teacher image rows {t_img.rows} over {teacher.keys[t_index].shape[-2]} keys != student "
            f"{s_img.rows} over {student.keys[s_index].shape[-2]}: SHD needs the same token layout"
        )
    if t_img.out_weight is None:
        raise ValueError("the teacher's image rows have no out-projection")
    rows = t_img.rows
    cols = rows if keys == "image" else slice(0, teacher.keys[t_index].shape[-2])
    return ShdInputs(
        student_q=student.queries[s_index][:, :, rows],  # (B, H_s, N_img, d_s)
        student_k=student.keys[s_index][:, :, cols],  # (B, H_s, M, d_s)
        teacher_q=teacher.queries[t_index][:, :, rows],  # (B, H_t, N_img, d_t)
        teacher_k=teacher.keys[t_index][:, :, cols],  # (B, H_t, M, d_t)
        teacher_v=teacher.values[t_index][:, :, cols],  # (B, H_t, M, d_t)
        out_weight=t_img.out_weight,
        student_bias=key_bias(student.biases[s_index], rows, cols),
        teacher_bias=key_bias(teacher.biases[t_index], rows, cols),
        teacher_out=teacher.outputs[t_index][:, :, rows] if keys == "all" else None,
    )
