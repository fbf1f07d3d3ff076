"""The base class of DiT and MDTv2: diffusers save/load, the shared upstream init, checkpointing.

Also the published sizes both families' registries use (:data:`PUBLISHED_SIZES`).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from shd_diffusion.attention import Attention, CaptureProcessor, QKCaptureProcessor
from shd_diffusion.models.layers import AdaLNZeroBlock, get_2d_sincos_pos_embed

__all__ = ["DiffusionTransformerBase", "PUBLISHED_SIZES"]

#: (depth, hidden_size, num_heads) of the published sizes, shared by DiT and MDTv2.
PUBLISHED_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _xavier_linear(module: nn.Module) -> None:
    """Xavier-uniform weight and zero bias for every ``nn.Linear`` (upstream's basic init)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# Processors that record into a store (each has ``scratch()``: the same processor, throwaway store).
_RECORDING = (CaptureProcessor, QKCaptureProcessor)


def _capturing(module: nn.Module) -> bool:
    """Whether any attention module inside ``module`` currently records maps or q/k."""
    return any(isinstance(getattr(m, "processor", None), _RECORDING) for m in module.modules())


@contextlib.contextmanager
def _scratch_capture(module: nn.Module) -> Iterator[None]:
    """While a checkpointed block is recomputed in backward, send its captures to a scratch store.

    Without this, every recomputation would append a second copy of the block's maps to the
    store of an open :func:`~shd_diffusion.attention.capture_attention` context.
    """
    swapped = []
    for m in module.modules():
        proc = getattr(m, "processor", None)
        if isinstance(proc, _RECORDING) and hasattr(m, "set_processor"):
            swapped.append((m, proc))
            m.set_processor(proc.scratch())
    try:
        yield
    finally:
        for m, proc in swapped:
            m.set_processor(proc)


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: plain forward, scratch recompute.

    A module-level function (bound with ``functools.partial``), not a lambda: dynamo only accepts
    plain or partial functions as ``context_fn``.
    """
    return contextlib.nullcontext(), _scratch_capture(module)


class DiffusionTransformerBase(ModelMixin, ConfigMixin):
    """What DiT and MDTv2 share: diffusers save/load, block checkpointing, output layout.

    Subclasses decorate ``__init__`` with ``@register_to_config``, so ``save_pretrained`` writes
    ``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``from_pretrained`` rebuilds the
    model from them. ``gradient_checkpointing`` (a plain bool, also set by
    ``enable_gradient_checkpointing()``) recomputes each block in the backward pass.

    ``torch.compile(model)`` / ``model.compile()`` need no helper (tested against eager, forward
    and backward, with and without checkpointing):
      - the unmasked forward compiles to one graph (``fullgraph=True`` works), also while
        :func:`~shd_diffusion.attention.capture_attention` is open: the store appends are
        replayed after the graph;
      - capture *plus* gradient checkpointing: a map append inside a checkpointed block is a side
        effect dynamo refuses to trace, so it breaks the graph there and runs those blocks'
        checkpoints eagerly (correct, slower). Leave dynamo's
        ``skip_fwd_side_effects_in_bwd_under_checkpoint`` at its default (False);
      - the masked pass reads its mask ratio on the host (a graph break) and has a data-dependent
        token count (one graph per kept-token count, or ``dynamic=True``).
    """

    _supports_gradient_checkpointing = True

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def initialize_weights(self) -> None:
        """Upstream init: xavier linears, sin-cos ``pos_embed``, N(0, 0.02) embeddings, adaLN-Zero.

        The draws run in DiT's order (linears in module order, patch conv, label table, timestep
        MLP), so a seed gives upstream's weights; a subclass adds its own init after this call.
        Every :class:`AdaLNZeroBlock` and the final layer start at zero: blocks are the identity
        and the output is zero.
        """
        self.apply(_xavier_linear)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)  # (N, D)
        self.pos_embed.data.copy_(pos.unsqueeze(0))  # (1, N, D)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C*p*p): the patch conv as a linear map
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNZeroBlock):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        """Label id of the null class used for classifier-free guidance (= num_classes)."""
        return self.y_embedder.null_class

    def attention_layers(self) -> list[Attention]:
        """Attention modules in execution order of the unmasked forward (for capture)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Any = None) -> None:
        """Recompute each block in the backward pass (diffusers' API; only the built-in function).

        Args:
            gradient_checkpointing_func: must be None: blocks always use non-reentrant
                ``torch.utils.checkpoint`` with a recompute context that keeps attention capture
                stores clean (see :meth:`_run_block`).
        """
        if gradient_checkpointing_func is not None:
            raise NotImplementedError(f"{type(self).__name__} uses its own checkpointing; pass no function")
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Turn block recomputation off."""
        self.gradient_checkpointing = False

    def _run_block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        """Call ``block(*args)``, recomputing it in backward when gradient checkpointing is on."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args)
        # Non-reentrant: works with inputs that need no grad and with None arguments, and lets
        # gradients flow through captured maps that leave the block via the store.
        if _capturing(block):
            # Recomputation re-runs the processors' Python, which must not append maps again.
            # Decided here, not via torch.compiler.is_compiling(): under torch.compile the store
            # append inside a checkpoint breaks the graph, and dynamo runs this very call eagerly.
            return checkpoint(block, *args, use_reentrant=False, context_fn=partial(_recompute_contexts, block))
        return checkpoint(block, *args, use_reentrant=False)

    def _condition(
        self,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """(B,) timesteps + (B,) labels -> (B, D) block condition ``c = t_emb + y_emb``."""
        t_emb = self.t_embedder(t)  # (B, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids, generator)  # (B, D)
        return t_emb + y_emb
