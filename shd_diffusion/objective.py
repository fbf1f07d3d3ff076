"""The distillation objective: the per-sample loss terms of one micro-batch (EDM ``loss.py`` style).

:class:`DistillationObjective` takes the trained modules (:class:`TrainedModules`), the frozen teacher
and a batch, and returns named per-sample terms -- student diffusion loss (plus the terms of the
family's extra passes, :attr:`FamilySpec.extra_pass <shd_diffusion.families.FamilySpec>`: MDTv2's
masked pass), output KD, SHD, feature distillation -- plus their weighted sum. The weights
(``distill.kd_weight`` = lambda_kd, ``distill.shd_beta`` = beta, ``distill.feature_weight``) are
applied in one place, :func:`weighted_total`; the training loop only averages over the batch,
back-propagates and logs every named term it is given. Adding a term: compute it here, weigh it
in :func:`weighted_total`, and give its weight a field in ``DistillConfig`` (``train_config.py``);
a term that needs new modules (a projector) also adds them to :class:`TrainedModules`.

SHD runs on captured q, k (:func:`~shd_diffusion.attention.capture_qk`): both forwards stay on
fused attention, and each layer pair's term is :func:`~shd_diffusion.shd.shd_term` over blocks of
query rows (``distill.chunk_size``), so no (B, H, N, N) map is ever stored. Which rows and keys of
a captured entry are distilled is the family's (:attr:`FamilySpec.shd_inputs`): every token for
image-only models, the image-query rows for text-to-image ones.

The noising process is the family's too (:attr:`FamilySpec.objective`): :class:`GaussianProcess`
(DDPM with learned variance: DiT, MDTv2, PixArt; eps loss, KD on the whole output) or
:class:`FlowProcess` (rectified flow: SD3, FLUX.1, Qwen-Image; velocity MSE, KD on the velocity).
The conditioning (labels, or a text dict with the empty prompt swapped in by CFG dropout) and the
model call (latent packing, timestep convention) come from the spec as well, so this module holds
no family knowledge.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from . import shd as shd_math
from .attention import AttentionStore, capture_attention, capture_qk
from .diffusion import GaussianDiffusion
from .diffusion import flow
from .distill import FeatureProjectors, capture_block_outputs, feature_loss, kd_loss, self_correlation_loss
from .train_config import DistillConfig

if TYPE_CHECKING:  # families import this module (per_sample); the objective only reads a spec
    from .families import FamilySpec

__all__ = [
    "StepTerms", "DiffusionBatch", "TrainedModules", "DistillationObjective", "WholeMapObjective", "weighted_total",
    "per_sample", "noised", "GaussianProcess", "FlowProcess", "make_process",
]

# A capture: model -> context manager yielding the store its forward fills.
Capture = Callable[[nn.Module], ContextManager[AttentionStore]]


@dataclass
class StepTerms:
    """Per-sample loss terms of one micro-batch, and the diagnostics logged with them."""

    terms: dict[str, torch.Tensor]  # name -> (B,) unweighted per-sample values
    total: torch.Tensor  # (B,) weighted sum that is back-propagated (after the mean)
    alphas: list[torch.Tensor] = field(default_factory=list)  # per SHD layer (B, H_t)


@dataclass(frozen=True)
class DiffusionBatch:
    """One micro-batch as the objective drew it: what a family's extra training pass works from
    (:attr:`shd_diffusion.families.FamilySpec.extra_pass`)."""

    x0: torch.Tensor  # (B, C, H, W) clean latents / pixels
    t: torch.Tensor  # (B,) timesteps of the main pass
    y: torch.Tensor  # (B,) labels
    drop: torch.Tensor  # (B,) 1 = label dropped (CFG), the same for every pass and the teacher
    gens: list[torch.Generator]  # one per sample; an extra pass draws after the main pass's draws
    mask_ratio_draw: float  # this step's U(0, 1) draw (MDT's mask ratio), shared by the global batch
    mse_weight: torch.Tensor | None  # (B,) eps-MSE weights (min-SNR), None = uniform
    num_tokens: int  # N, the model's tokens per image


def weighted_total(terms: dict[str, torch.Tensor], dc: DistillConfig, family_terms: Sequence[str] = ()
                   ) -> torch.Tensor:
    """The one place where the terms are weighted: sum of weight x term, per sample (B,).

    ``family_terms``: the diffusion terms of the family's extra passes (``FamilySpec.extra_terms``),
    weighted 1 like ``"diffusion"``. Any other unknown name is a KeyError.
    """
    weights = {"diffusion": 1.0, **dict.fromkeys(family_terms, 1.0), "kd": dc.kd_weight, "shd": dc.shd_beta,
               "feature": dc.feature_weight}
    total: torch.Tensor | None = None
    for name, value in terms.items():
        part = value if weights[name] == 1.0 else weights[name] * value
        total = part if total is None else total + part
    assert total is not None, "the diffusion term is always present"
    return total


def per_sample(gens: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """Stack one draw per sample, each from its own generator: (B, ...)."""
    return torch.stack([draw(g) for g in gens])


def noised(diffusion: GaussianDiffusion, x0: torch.Tensor, gens: list[torch.Generator]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's timestep and noise (first draws of its generator), and x_t = q(x_t | x_0).

    Returns:
        t (B,), noise (B, C, H, W) and x_t (B, C, H, W), in ``x0``'s dtype.
    """
    dev, steps = x0.device, diffusion.num_timesteps
    t = per_sample(gens, lambda g: torch.randint(0, steps, (), generator=g, device=dev))
    noise = per_sample(gens, lambda g: torch.randn(x0.shape[1:], generator=g, device=dev)).to(x0.dtype)
    return t, noise, diffusion.q_sample(x0, t, noise)


class GaussianProcess:
    """DDPM noising and loss (learned-range variance, hybrid loss): the objective of DiT-like families.

    The model is told the integer timestep; KD compares the whole output (eps and variance channels).
    """

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion

    def noised(self, x0: torch.Tensor, gens: list[torch.Generator]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """t (B,), noise and x_t (B, C, H, W) (:func:`noised`), and the model's timestep (= t)."""
        t, noise, x_t = noised(self.diffusion, x0, gens)
        return t, noise, x_t, t

    def weight(self, t: torch.Tensor, min_snr: bool) -> torch.Tensor | None:
        """Min-SNR-5 weights of the eps MSE (B,), or None (uniform)."""
        return self.diffusion.min_snr_weight(t) if min_snr else None

    def loss(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        """Per-sample hybrid loss (B,) of the output (B, C or 2C, H, W)."""
        return self.diffusion.training_losses(out.float(), x0, x_t, t, noise, mse_weight=weight)["loss"]

    @staticmethod
    def kd(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """Output KD (B,): :func:`~shd_diffusion.distill.kd_loss`."""
        return kd_loss(student_out, teacher_out)


class FlowProcess:
    """Rectified flow (:mod:`shd_diffusion.diffusion.flow`): the objective of SD3, FLUX and Qwen-Image.

    Args:
        config_for: latent shape (C, H, W) -> the family's :class:`~shd_diffusion.diffusion.flow.FlowConfig`
            (FLUX's shift depends on the image token count, so it is resolved per latent shape).
    """

    def __init__(self, config_for: Callable[[tuple[int, ...]], flow.FlowConfig]) -> None:
        self.config_for = config_for

    def noised(self, x0: torch.Tensor, gens: list[torch.Generator]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """t (B,) in [0, 1], noise and x_t (B, C, H, W) (each sample's first draws), and the model's
        timestep ``t * timestep_scale`` in float32."""
        cfg = self.config_for(tuple(x0.shape[1:]))
        t, noise, x_t = flow.noised(cfg, x0, gens)
        return t, noise, x_t, flow.model_timestep(t, cfg.timestep_scale).float()

    def weight(self, t: torch.Tensor, min_snr: bool) -> None:
        """Uniform: Min-SNR-5 is an eps-loss weighting (refused for flow families by :func:`make_process`)."""
        return None

    def loss(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             weight: torch.Tensor | None) -> torch.Tensor:
        """Per-sample velocity MSE (B,) against ``noise - x0``."""
        return flow.training_losses(out.float(), x0, noise)["loss"]

    @staticmethod
    def kd(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """KD on the velocity (B,)."""
        return flow.velocity_kd(student_out, teacher_out)


def make_process(family: FamilySpec, diffusion: GaussianDiffusion, min_snr: bool) -> GaussianProcess | FlowProcess:
    """The noising process the family's spec names (``objective``).

    Raises:
        ValueError: Min-SNR-5 weighting asked of a flow family.
    """
    if family.objective == "diffusion":
        return GaussianProcess(diffusion)
    if min_snr:
        raise ValueError(f"train.loss_weighting=min_snr5 weights an eps loss; {family.name} trains with rectified "
                         "flow (velocity loss): set train.loss_weighting=auto or uniform")
    return FlowProcess(family.flow)


class TrainedModules(nn.Module):
    """Everything that trains: the student plus the optional feature projectors.

    The one module the optimizer steps and DDP wraps. Its forward runs one student pass and
    returns the output plus what the distillation terms need (the SHD capture's store, block
    features), so DDP sees one forward per pass.
    """

    def __init__(self, student: nn.Module, projectors: FeatureProjectors | None = None) -> None:
        super().__init__()
        self.student = student
        self.projectors = projectors

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        capture: Capture | None = None,
        feature_layers: list[int] | None = None,
        run: Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor, AttentionStore | None, list[torch.Tensor]]:
        """One student pass: ``run(student, x, t, y)`` (the family's call) or ``student(x, t, y, **model_kwargs)``."""
        store = None
        feats: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            if capture is not None:
                store = stack.enter_context(capture(self.student))
            if feature_layers:
                feats = stack.enter_context(capture_block_outputs(self.student, feature_layers))
            out = run(self.student, x, t, y) if run is not None else self.student(x, t, y, **model_kwargs)
        return out, store, list(feats)


class DistillationObjective:
    """Per-sample terms of the distillation objective for one micro-batch.

    Args:
        cfg: the ``distill`` section. diffusion: the training diffusion.
        teacher: the frozen teacher (eval mode, no grad), or None for ``distill.mode=none``.
        layer_pairs: (student layer, teacher layer) per distilled pair, in student-layer order (with
            ``cfg.cross_attention``: in the capture numbering that counts cross-attention).
        family: the student's family: how it is conditioned and called, its process (DDPM or flow),
            which captured rows SHD distils, and its extra passes (run after the main pass).
        min_snr: Min-SNR-5 weights on the eps MSE.
        drop_prob: CFG-dropout probability (labels, or the empty prompt). num_tokens: N (what extra passes
            may draw per token).
        teacher_family: the teacher's family (how it is called); None = ``family``.
        empty_conditioning: the dataset's empty-prompt dict (text families' CFG dropout); settable later.
    """

    def __init__(self, cfg: DistillConfig, diffusion: GaussianDiffusion, teacher: nn.Module | None,
                 layer_pairs: Sequence[tuple[int, int]], *, family: FamilySpec, min_snr: bool, drop_prob: float,
                 num_tokens: int, teacher_family: FamilySpec | None = None,
                 empty_conditioning: Mapping[str, torch.Tensor] | None = None) -> None:
        self.cfg, self.diffusion, self.teacher = cfg, diffusion, teacher
        self.process = make_process(family, diffusion, min_snr)
        self.layer_pairs = list(layer_pairs)
        self.family, self.min_snr, self.drop_prob, self.num_tokens = family, min_snr, drop_prob, num_tokens
        self.teacher_family = teacher_family or family
        self.empty_conditioning = empty_conditioning
        self.shd_on = cfg.uses_shd and bool(self.layer_pairs)
        self.feat_on = cfg.feature_kind is not None and bool(self.layer_pairs)

    # The SHD hooks: what is captured and how a layer pair's term is computed from it.
    # With distill.cross_attention the pairs are numbered with cross-attention counted (training.heads).
    def student_capture(self, model: nn.Module) -> ContextManager[AttentionStore]:
        return capture_qk(model, [j for j, _ in self.layer_pairs], cross_attention=self.cfg.cross_attention)

    def teacher_capture(self, model: nn.Module) -> ContextManager[AttentionStore]:
        return capture_qk(model, sorted({i for _, i in self.layer_pairs}), export_values=True,
                          cross_attention=self.cfg.cross_attention)

    def shd_terms(self, s: AttentionStore, t: AttentionStore, squeezers: Sequence[shd_math.HeadSqueezer]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """L_SHD per sample (B,) (before beta) and alphas per pair, from the two captures."""
        dc = self.cfg
        total: torch.Tensor | None = None
        alphas, heads = [], 0
        for (j, i), sq in zip(self.layer_pairs, squeezers):
            a, b = s.layer_indices.index(j), t.layer_indices.index(i)
            inputs = self.family.shd_inputs(t, b, s, a, dc.shd_keys)  # q, k, v, W^O, biases, A V of the distilled rows
            loss, alpha = shd_math.shd_term(
                **inputs, groups=sq.groups, temperature=dc.temperature, chunk_size=dc.chunk_size, loss=dc.loss,
                mode=sq.mode, generator_seed=sq.seed,
            )
            total = loss if total is None else total + loss
            alphas.append(alpha)
            heads += sq.student_heads
        assert total is not None
        return (total / heads if dc.reduction == "mean" else total), alphas

    def __call__(self, trained: nn.Module, x0: torch.Tensor, y: Any, gens: list[torch.Generator],
                 mask_ratio_draw: float, squeezers: Sequence[shd_math.HeadSqueezer]) -> StepTerms:
        """Terms for clean inputs ``x0`` (B, C, H, W) and labels ``y`` (B,) or a conditioning dict of (B, ...).

        ``gens``: one generator per sample (timestep, noise, CFG drop, then the family's extra
        passes: MDT's keep set); ``mask_ratio_draw``: this step's MDT mask-ratio draw;
        ``squeezers``: one per layer pair.
        """
        dc, proc, dev = self.cfg, self.process, x0.device
        t, noise, x_t, model_t = proc.noised(x0, gens)
        # Drop labels / prompts once, here, so student and teacher see the same conditioning.
        drop = (per_sample(gens, lambda g: torch.rand((), generator=g, device=dev)) < self.drop_prob).long()
        cond = self.family.condition(y, drop, self.empty_conditioning)
        weight = proc.weight(t, self.min_snr)
        s_layers = [j for j, _ in self.layer_pairs]
        out, s_store, s_feats = trained(x_t, model_t, cond, capture=self.student_capture if self.shd_on else None,
                                        feature_layers=s_layers if self.feat_on else None, run=self.family.forward)
        terms = {"diffusion": proc.loss(out, x0, x_t, t, noise, weight)}
        if self.family.extra_pass is not None:  # MDTv2: the masked pass
            batch = DiffusionBatch(x0, t, y, drop, gens, mask_ratio_draw, weight, self.num_tokens)
            terms.update(self.family.extra_pass(trained, self.diffusion, batch))
        alphas: list[torch.Tensor] = []
        if self.teacher is not None:
            t_out, t_store, t_feats = self._teacher(x_t, model_t, cond)
            if dc.uses_kd:
                terms["kd"] = proc.kd(out, t_out)
            if self.shd_on:
                terms["shd"], alphas = self.shd_terms(s_store, t_store, squeezers)
            if self.feat_on:
                terms["feature"] = self._feature(trained, s_feats, t_feats)
        return StepTerms(terms=terms, total=weighted_total(terms, dc, self.family.extra_terms), alphas=alphas)

    @torch.no_grad()
    def _teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any
                 ) -> tuple[torch.Tensor, AttentionStore | None, dict[int, torch.Tensor]]:
        """The teacher's output, SHD capture and block features (per teacher layer), no graph.

        ``t``: the model's timestep; ``cond``: the conditioning after CFG dropout (the student's).
        """
        t_layers = sorted({i for _, i in self.layer_pairs})
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(self.teacher_capture(self.teacher)) if self.shd_on else None
            feats = stack.enter_context(capture_block_outputs(self.teacher, t_layers)) if self.feat_on else []
            out = self.teacher_family.forward(self.teacher, x_t, t, cond)
        return out, store, dict(zip(t_layers, feats))

    def _feature(self, trained: nn.Module, s_feats: list[torch.Tensor], t_feats: dict[int, torch.Tensor]) -> torch.Tensor:
        t_sel = [t_feats[i] for _, i in self.layer_pairs]
        if self.cfg.feature_kind == "projector":
            return feature_loss(s_feats, t_sel, _unwrap(trained).projectors)
        return self_correlation_loss(s_feats, t_sel)



class WholeMapObjective(DistillationObjective):
    """The same objective with SHD on whole (B, H, N, N) maps: captured, squeezed and compared whole.

    The path training ran before the row-block term: O(N^2) memory per distilled layer. Kept as
    the reference the row-block path is tested against (tests/test_objective.py) and timed against
    (``benchmarks/bench_train_step.py --modes kd_shd_maps``); training uses the base class.
    """

    @classmethod
    def like(cls, objective: DistillationObjective) -> "WholeMapObjective":
        """The whole-map twin of ``objective``: same config, diffusion, teacher, layer pairs and settings."""
        o = objective
        return cls(o.cfg, o.diffusion, o.teacher, o.layer_pairs, family=o.family, min_snr=o.min_snr,
                   drop_prob=o.drop_prob, num_tokens=o.num_tokens, teacher_family=o.teacher_family,
                   empty_conditioning=o.empty_conditioning)

    def student_capture(self, model: nn.Module) -> ContextManager[AttentionStore]:
        return capture_attention(model, self.cfg.temperature, [j for j, _ in self.layer_pairs])

    def teacher_capture(self, model: nn.Module) -> ContextManager[AttentionStore]:
        return capture_attention(model, self.cfg.temperature, sorted({i for _, i in self.layer_pairs}),
                                 export_values=True)

    def shd_terms(self, s: AttentionStore, t: AttentionStore, squeezers: Sequence[shd_math.HeadSqueezer]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """L_SHD per sample (B,) (before beta) and alphas per pair, from whole maps."""
        slots = [t.layer_indices.index(i) for _, i in self.layer_pairs]
        soft = None if self.cfg.temperature == 1.0 else [t.maps[k] for k in slots]
        targets, alphas = shd_math.squeeze_layers(
            squeezers, [t.probs[k] for k in slots], [t.values[k] for k in slots],
            [t.out_weights[k] for k in slots], soft, [t.outputs[k] for k in slots])
        maps = [s.maps[s.layer_indices.index(j)] for j, _ in self.layer_pairs]
        loss = shd_math.shd_loss(maps, targets, beta=1.0, kind=self.cfg.loss, reduction=self.cfg.reduction)
        return loss, alphas

def _unwrap(trained: nn.Module) -> nn.Module:
    """The :class:`TrainedModules` inside a DDP (or compiled) wrapper."""
    return getattr(trained, "module", trained)
