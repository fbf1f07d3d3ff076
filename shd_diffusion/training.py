"""Teacher-student training loop: diffusion loss + KD + SHD, with exact resume.

The loop is step-based (no epochs): step ``s`` consumes a fixed slice of a deterministic data
stream and draws all of its randomness (timesteps, noise, label drops, MDT masks) from a
generator seeded by ``(seed, s, rank, micro-step)``. Resuming therefore needs only the
checkpointed weights, EMA, optimizer, lr schedule and step: the stream position is derived from
the step, and a resumed run reproduces the uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import shd as shd_math
from .attention import attention_layers, capture_attention
from .checkpoint import (
    PreemptionHandler,
    capture_rng_state,
    check_resume_compatible,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import dump_yaml, to_dict
from .data import build_dataset, make_loader
from .diffusion import GaussianDiffusion, create_diffusion
from .distill import FeatureProjectors, capture_block_outputs, feature_loss, kd_loss, self_correlation_loss
from .models import create_model
from .models.loading import extract_state_dict, load_checkpoint_file, load_official_state_dict
from .optim import EMA, build_optimizer, build_scheduler
from .train_config import SHAPE_FIELDS, ExperimentConfig, ModelConfig

__all__ = ["Trainer", "run_dir_for", "NonFiniteLossError", "StepTerms"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def run_dir_for(cfg: ExperimentConfig, config_path: str | Path | None, overrides: list[str]) -> Path:
    """Run folder named by the config (never auto-incremented), so a requeued job resumes itself.

    ``train.run_name`` wins; otherwise the config file's stem, plus a short hash of the
    command-line overrides when there are any (two sweeps of one file get two folders).
    """
    name = cfg.train.run_name
    if name is None:
        name = Path(config_path).stem if config_path else "run"
        relevant = sorted(o for o in overrides if not o.startswith("train.run_name="))
        if relevant:
            name += "-" + hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:8]
    return Path(cfg.train.output_dir) / name


def _seeded_generator(key: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1))
    return gen


def sample_generators(seed: int, positions: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample, keyed by the sample's position in the global data stream.

    A sample's timestep, noise and label drop then depend only on (seed, position), not on the
    number of processes or the micro-batch it lands in: a 2-process run sees exactly the samples
    and noise of the 1-process run with the same global batch.
    """
    return [_seeded_generator(f"sample/{seed}/{p}", device) for p in positions]


def batch_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """Generator for per-batch draws (MDT's mask ratio and keep sets), keyed by (step, rank, micro)."""
    return _seeded_generator(f"batch/{seed}/{step}/{rank}/{micro}", device)


def _per_sample(gens: list[torch.Generator], draw: Any) -> torch.Tensor:
    return torch.stack([draw(g) for g in gens])


def _is_mdt(model: nn.Module) -> bool:
    return type(model).__name__.startswith("MDT")


def build_model(mc: ModelConfig) -> nn.Module:
    """Instantiate a registry model with the config's overrides."""
    return create_model(mc.name, **mc.overrides())


@dataclass
class StepTerms:
    """Per-sample loss terms of one micro-batch, and the diagnostics logged with them."""

    terms: dict[str, torch.Tensor]  # name -> (B,) unweighted per-sample values
    total: torch.Tensor  # (B,) weighted sum that is back-propagated (after the mean)
    alphas: list[torch.Tensor] = field(default_factory=list)  # per SHD layer (B, H_t)


class StudentSide(nn.Module):
    """Everything that trains (student + optional feature projectors); DDP wraps this module.

    Its forward runs one student pass and returns the output plus whatever the distillation
    terms need (captured maps, block features), so DDP sees one forward per pass.
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
        shd_layers: list[int] | None = None,
        temperature: float = 1.0,
        feature_layers: list[int] | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        maps: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            if shd_layers:
                maps = stack.enter_context(capture_attention(self.student, temperature, shd_layers)).maps
            if feature_layers:
                feats = stack.enter_context(capture_block_outputs(self.student, feature_layers))
            out = self.student(x, t, y, **model_kwargs)
        return out, list(maps), list(feats)


class Trainer:
    """Owns one training run: models, data stream, optimizer, EMA, checkpoints and logging.

    Args:
        cfg: the validated experiment config.
        run_dir: the run folder (see :func:`run_dir_for`).
        accelerator: an ``accelerate.Accelerator`` (created by the caller so tests can pick one).
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, accelerator: Any) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.device = accelerator.device
        tc, dc = cfg.train, cfg.distill
        world = accelerator.num_processes
        if tc.global_batch_size % (world * tc.grad_accum):
            raise ValueError(
                f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                f"processes ({world}) x train.grad_accum ({tc.grad_accum})"
            )
        self.micro_batch = tc.global_batch_size // (world * tc.grad_accum)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        student = build_model(cfg.student)
        if tc.grad_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
            student.enable_gradient_checkpointing()
        self.is_mdt = _is_mdt(student)
        self.null_class = int(student.null_class)
        self.drop_prob = float(student.config.class_dropout_prob)

        self.teacher: nn.Module | None = None
        if dc.uses_teacher:
            self.teacher = self._load_teacher()
        self.layer_pairs, self.groups = self._plan_distillation(student)

        projectors = None
        if dc.feature_kind == "projector":
            projectors = FeatureProjectors(
                student.config.hidden_size, self.teacher.config.hidden_size, len(self.layer_pairs)
            )
        self.side = StudentSide(student, projectors)
        self.ema = EMA(student, decay=tc.ema_decay)

        oc = cfg.optim
        optimizer = build_optimizer(
            self.side.parameters(), oc.name, lr=oc.lr, betas=tuple(oc.betas) if oc.betas else None, weight_decay=oc.weight_decay, eps=oc.eps
        )
        scheduler = build_scheduler(optimizer, oc.warmup_steps)
        # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step
        # it once per process, which changes what warmup_steps means with the world size.
        self.scheduler = scheduler
        self.side, self.optimizer = accelerator.prepare(self.side, optimizer)
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.ema.to(self.device)

        self.diffusion: GaussianDiffusion = create_diffusion(learn_sigma=cfg.student.learn_sigma)
        weighting = tc.loss_weighting
        self.min_snr = weighting == "min_snr5" or (weighting == "auto" and self.is_mdt)

        self._dataset = None  # built on first use (benchmarks drive compute_terms directly)
        self.vae = None
        if cfg.data.kind == "image_folder":
            self.vae = _load_vae(cfg.data.vae, self.device)
        self.step = 0

    # ---------------------------------------------------------------- setup helpers
    def _load_teacher(self) -> nn.Module:
        tcfg = self.cfg.teacher
        teacher = build_model(tcfg.model)
        if tcfg.checkpoint is None:
            raise ValueError(
                f"distill.mode={self.cfg.distill.mode} needs a teacher: set teacher.checkpoint to an official "
                ".pt file, a checkpoint of this package, or a save_pretrained folder"
            )
        load_model_weights(teacher, tcfg.checkpoint, use_ema=tcfg.use_ema)
        teacher.eval().requires_grad_(False)
        return teacher

    def _plan_distillation(self, student: nn.Module) -> tuple[list[tuple[int, int]], list[list[list[int]]]]:
        """(student layer, teacher layer) pairs and per-pair head groups, validated up front."""
        dc = self.cfg.distill
        if self.teacher is None or not (dc.uses_shd or dc.feature_kind):
            return [], []
        s_layers, t_layers = attention_layers(student), attention_layers(self.teacher)
        mapping = shd_math.layer_mapping(len(s_layers), len(t_layers), dc.layer_map)
        chosen = range(len(s_layers)) if dc.student_layers is None else dc.student_layers
        for j in chosen:
            if not 0 <= j < len(s_layers):
                raise ValueError(f"distill.student_layers: {j} is out of range (student has {len(s_layers)} layers)")
        pairs = [(j, mapping[j]) for j in sorted(set(chosen))]
        s_tokens, t_tokens = _num_tokens(student), _num_tokens(self.teacher)
        groups: list[list[list[int]]] = []
        for j, i in pairs:
            h_s, h_t = int(s_layers[j].heads), int(t_layers[i].heads)
            shd_math.validate_pair(h_s, h_t, s_tokens, t_tokens)
            groups.append(shd_math.resolve_groups(h_t, h_s, _squeeze_mode(dc.squeeze), dc.groups, dc.seed))
        return pairs, groups

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        side = self.acc.unwrap_model(self.side)
        return {
            "step": self.step,
            "model": side.student.state_dict(),
            "projectors": side.projectors.state_dict() if side.projectors is not None else None,
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "groups": self.groups,
            "config": to_dict(self.cfg),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume_compatible(state["config"], to_dict(self.cfg), SHAPE_FIELDS)
        side = self.acc.unwrap_model(self.side)
        side.student.load_state_dict(state["model"])
        if side.projectors is not None:
            side.projectors.load_state_dict(state["projectors"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.groups = [[list(g) for g in layer] for layer in state["groups"]]
        restore_rng_state(state["rng"])
        self.step = int(state["step"])

    def save(self) -> Path | None:
        """Write a checkpoint from the main process (atomic; keeps the last K)."""
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            path = save_checkpoint(self.state_dict(), self.run_dir, self.step, self.cfg.train.keep_last)
        self.acc.wait_for_everyone()
        return path

    def resume(self, resume: str) -> bool:
        """``resume``: "auto" (latest in the run folder, if any), "none", or a checkpoint path."""
        if resume == "none":
            return False
        path = latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        self.print(f"resumed from {path} at step {self.step}")
        return True

    # ---------------------------------------------------------------- the step
    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            dc = self.cfg.data
            self._dataset = build_dataset(dc.kind, dc.path, dc.image_size)
        return self._dataset

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tc = self.cfg.train
        start = self.step * self.micro_batch * tc.grad_accum
        loader = make_loader(
            self.dataset,
            self.micro_batch,
            rank=self.acc.process_index,
            world_size=self.acc.num_processes,
            seed=tc.seed,
            start=start,
            num_workers=self.cfg.data.num_workers,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def _encode(self, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Pixels -> SD-VAE latents (sampled from the posterior, per-sample seeded), if a VAE is used."""
        if self.vae is None:
            return x
        dist = self.vae.encode(x).latent_dist
        noise = _per_sample(gens, lambda g: torch.randn(dist.mean.shape[1:], generator=g, device=x.device))
        return (dist.mean + dist.std * noise.to(dist.mean.dtype)) * 0.18215

    def _maybe_match_heads(self, x0: torch.Tensor, y: torch.Tensor) -> None:
        """Head matching (paper Tab. 5): groups from teacher maps on one calibration batch, once."""
        if self.cfg.distill.squeeze != "matching" or self.cfg.distill.groups is not None or not self.layer_pairs:
            return
        gen = batch_generator(self.cfg.train.seed, -1, 0, 0, self.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device, generator=gen)
        x_t = self.diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen, device=self.device))
        teacher_layers = [i for _, i in self.layer_pairs]
        with torch.no_grad(), capture_attention(self.teacher, 1.0, sorted(set(teacher_layers))) as store:
            self.teacher(x_t, t, y)
        by_layer = dict(zip(store.layer_indices, store.probs))
        self.groups = [
            shd_math.match_heads(by_layer[i], len(g)) for (j, i), g in zip(self.layer_pairs, self.groups)
        ]

    def compute_terms(
        self, x0: torch.Tensor, y: torch.Tensor, gens: list[torch.Generator], batch_gen: torch.Generator
    ) -> StepTerms:
        """Per-sample loss terms for one micro-batch.

        Objective: student diffusion loss (MDTv2: unmasked + masked pass) + kd_weight * KD +
        shd_beta * L_SHD (unmasked pass only) + feature_weight * feature term, per the mode.

        Args:
            x0: (B, C, H, W) clean latents/pixels. y: (B,) labels.
            gens: one generator per sample (timestep, noise, label drop).
            batch_gen: generator for MDT's per-batch mask draw.
        """
        dc, diff = self.cfg.distill, self.diffusion
        dev = self.device
        t = _per_sample(gens, lambda g: torch.randint(0, diff.num_timesteps, (), generator=g, device=dev))
        noise = _per_sample(gens, lambda g: torch.randn(x0.shape[1:], generator=g, device=dev)).to(x0.dtype)
        x_t = diff.q_sample(x0, t, noise)
        # Drop labels once, here, so student and teacher see the same (dropped) labels.
        drop = (_per_sample(gens, lambda g: torch.rand((), generator=g, device=dev)) < self.drop_prob).long()
        weight = diff.min_snr_weight(t) if self.min_snr else None

        shd_on = dc.uses_shd and bool(self.layer_pairs)
        feat_on = dc.feature_kind is not None and bool(self.layer_pairs)
        s_layers = [j for j, _ in self.layer_pairs]
        out, s_maps, s_feats = self.side(
            x_t,
            t,
            y,
            shd_layers=s_layers if shd_on else None,
            temperature=dc.temperature,
            feature_layers=s_layers if feat_on else None,
            force_drop_ids=drop,
        )
        terms: dict[str, torch.Tensor] = {}
        losses = diff.training_losses(out.float(), x0, x_t, t, noise, mse_weight=weight)
        terms["diffusion"] = losses["loss"]
        total = losses["loss"]

        if self.is_mdt:
            # Masked pass: same t, independent noise (as upstream), random keep set per sample.
            noise_m = _per_sample(gens, lambda g: torch.randn(x0.shape[1:], generator=g, device=dev)).to(x0.dtype)
            x_tm = diff.q_sample(x0, t, noise_m)
            out_m, _, _ = self.side(x_tm, t, y, enable_mask=True, force_drop_ids=drop, generator=batch_gen)
            masked = diff.training_losses(out_m.float(), x0, x_tm, t, noise_m, mse_weight=weight)["loss"]
            terms["diffusion_masked"] = masked
            total = total + masked

        alphas: list[torch.Tensor] = []
        if self.teacher is not None:
            t_layers = sorted({i for _, i in self.layer_pairs}) if (shd_on or feat_on) else None
            with torch.no_grad():
                with contextlib.ExitStack() as stack:
                    store = None
                    t_feats: list[torch.Tensor] = []
                    if shd_on:
                        store = stack.enter_context(
                            capture_attention(self.teacher, dc.temperature, t_layers, export_values=True)
                        )
                    if feat_on:
                        t_feats = stack.enter_context(capture_block_outputs(self.teacher, t_layers))
                    t_out = self.teacher(x_t, t, y, force_drop_ids=drop)
            if dc.uses_kd:
                terms["kd"] = kd_loss(out, t_out)
                total = total + dc.kd_weight * terms["kd"]
            if shd_on:
                slot = {i: k for k, i in enumerate(store.layer_indices)}
                mode = _squeeze_mode(dc.squeeze)
                targets = []
                for (j, i), groups in zip(self.layer_pairs, self.groups):
                    k = slot[i]
                    squeezed, a = shd_math.squeeze_heads(
                        store.probs[k], store.values[k], store.out_weights[k], len(groups),
                        groups=groups if mode in ("lstsq", "constant") else None,
                        mode=mode, generator_seed=dc.seed,
                    )
                    # alpha comes from the T=1 maps; the KL target is the softened maps mixed by it.
                    soft = squeezed if dc.temperature == 1.0 else shd_math.apply_alphas(store.maps[k], a, groups)
                    targets.append(soft)
                    alphas.append(a)
                terms["shd"] = shd_math.shd_loss(s_maps, targets, beta=1.0, kind=dc.loss, reduction=dc.reduction)
                total = total + dc.shd_beta * terms["shd"]
            if feat_on:
                by_layer = dict(zip(t_layers, t_feats))
                t_sel = [by_layer[i] for _, i in self.layer_pairs]
                if dc.feature_kind == "projector":
                    projectors = self.acc.unwrap_model(self.side).projectors
                    terms["feature"] = feature_loss(s_feats, t_sel, projectors)
                else:
                    terms["feature"] = self_correlation_loss(s_feats, t_sel)
                total = total + dc.feature_weight * terms["feature"]
        return StepTerms(terms=terms, total=total, alphas=alphas)

    # ---------------------------------------------------------------- the loop
    def print(self, msg: str) -> None:
        """Print from the main process only."""
        if self.acc.is_main_process:
            print(msg, flush=True)

    def fit(self, max_steps: int | None = None, progress: bool = True) -> dict[str, float]:
        """Train until ``train.steps`` (or ``max_steps`` more steps); returns the last logged scalars.

        Checkpoints every ``train.checkpoint_every`` steps, at the end, and when SIGTERM/SIGUSR1
        arrives (cluster preemption), then returns.
        """
        from tqdm.auto import tqdm

        tc = self.cfg.train
        end = tc.steps if max_steps is None else min(tc.steps, self.step + max_steps)
        batches = self._batches()
        if self.step == 0 and self.cfg.distill.squeeze == "matching":
            x, y = next(_peek(batches))
            self._maybe_match_heads(self._encode(x, sample_generators(tc.seed, list(range(-len(x), 0)), self.device)), y)
            batches = self._batches()
        bar = tqdm(total=end, initial=self.step, disable=not (progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        tick, seen = time.perf_counter(), 0
        side = self.side
        with PreemptionHandler() as preempt:
            while self.step < end:
                sums: dict[str, float] = {}
                alpha_stats: list[torch.Tensor] = []
                grad_norm = None
                for micro in range(tc.grad_accum):
                    x, y = next(batches)
                    gens = sample_generators(tc.seed, self._positions(micro, x.shape[0]), self.device)
                    x0 = self._encode(x, gens)
                    batch_gen = batch_generator(tc.seed, self.step, self.acc.process_index, micro, self.device)
                    with self.acc.accumulate(side), self.acc.autocast():
                        st = self.compute_terms(x0, y, gens, batch_gen)
                        loss = st.total.mean()
                        self._check_finite(loss)
                        self.acc.backward(loss)  # accelerate divides by grad_accum
                        if self.acc.sync_gradients:
                            if self.cfg.optim.max_grad_norm > 0:
                                grad_norm = self.acc.clip_grad_norm_(side.parameters(), self.cfg.optim.max_grad_norm)
                            self.optimizer.step()
                            self.scheduler.step()
                            self.optimizer.zero_grad(set_to_none=True)
                    for k, v in st.terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach().mean()) / tc.grad_accum
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / tc.grad_accum
                    alpha_stats.extend(a.detach() for a in st.alphas)
                    seen += x.shape[0]
                self.ema.update(self.acc.unwrap_model(side).student)
                self.step += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - tick
                    last = self._log(sums, alpha_stats, grad_norm, seen * self.acc.num_processes / max(elapsed, 1e-9))
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    tick, seen = time.perf_counter(), 0
                if self.step % tc.checkpoint_every == 0 or self.step == end:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.sample_grid()
                if self._any_rank(preempt.requested):
                    path = self.save()
                    self.print(f"preempted at step {self.step}: checkpoint saved{f' to {path}' if path else ''}; "
                               "rerun the same command to resume")
                    break
        bar.close()
        return last

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is set on any process (all ranks must agree before a collective save)."""
        if self.acc.num_processes == 1:
            return flag
        return float(self.acc.reduce(torch.tensor(float(flag), device=self.device), reduction="sum")) > 0

    def _positions(self, micro: int, size: int) -> list[int]:
        """Global stream positions of this rank's micro-batch (the sampler deals rank::world)."""
        local = (self.step * self.cfg.train.grad_accum + micro) * self.micro_batch
        world, rank = self.acc.num_processes, self.acc.process_index
        return [(local + i) * world + rank for i in range(size)]

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.device)
        if float(self.acc.reduce(bad, reduction="sum")) > 0:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}; no update was applied. Last good checkpoint: "
                f"{last if last else 'none yet'}. Lower optim.lr or check the data, then resume."
            )

    def _log(self, sums: dict[str, float], alphas: list[torch.Tensor], grad_norm: Any, img_per_s: float) -> dict[str, float]:
        scalars = {f"loss/{k}": v for k, v in sums.items()}
        scalars["loss"] = sums["loss"]
        scalars["lr"] = float(self.scheduler.get_last_lr()[0])
        scalars["throughput/img_per_s"] = img_per_s
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if torch.cuda.is_available():
            scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        n_pairs = len(self.layer_pairs)
        for k, a in enumerate(alphas):
            layer = self.layer_pairs[k % n_pairs][0] if n_pairs else k
            scalars[f"alpha/layer{layer:02d}_min"] = float(a.min())
            scalars[f"alpha/layer{layer:02d}_max"] = float(a.max())
            scalars[f"alpha/layer{layer:02d}_std"] = float(a.std())
        self.acc.log(scalars, step=self.step)
        return scalars

    @torch.no_grad()
    def sample_grid(self, num: int = 16, steps: str = "50") -> Path | None:
        """Sample a small grid with the EMA weights (CFG 4, ``steps`` respaced DDPM steps)."""
        if not self.acc.is_main_process:
            return None
        from torchvision.utils import save_image

        from sampling.sample import resolve_guidance_channels

        student = self.acc.unwrap_model(self.side).student
        diffusion = create_diffusion(steps, learn_sigma=self.cfg.student.learn_sigma)
        num_classes = self.null_class
        labels = torch.arange(num, device=self.device) % num_classes
        y = torch.cat([labels, torch.full_like(labels, self.null_class)])
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        shape = (num, student.config.in_channels, student.config.input_size, student.config.input_size)
        z = torch.randn(shape, generator=gen, device=self.device)
        guide = resolve_guidance_channels(3, student.config.in_channels)
        with self.ema.swapped_in(student):
            was_training = student.training
            student.eval()
            x = diffusion.p_sample_loop(
                lambda x_, t_, **_: student.forward_with_cfg(
                    torch.cat([x_, x_]), torch.cat([t_, t_]), y, 4.0, guidance_channels=guide
                )[:num],
                z,
            )
            student.train(was_training)
        if self.vae is not None:
            x = self.vae.decode(x / 0.18215).sample
        elif self.cfg.data.kind == "latents":
            return None  # no VAE loaded for latent runs: grids need decoding
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=int(math.sqrt(num)))
        return path


def load_model_weights(model: nn.Module, path: str | Path, use_ema: bool = True) -> nn.Module:
    """Load teacher weights from a file or folder, strictly (names the mismatch on failure).

    ``path`` may be an official ``.pt``/``.safetensors`` file, a checkpoint of this package, a run
    folder (its latest checkpoint), or a ``save_pretrained`` folder.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            latest = latest_checkpoint(p)
            if latest is None:
                raise FileNotFoundError(f"run folder {p} has no complete checkpoint yet")
            p = latest
        else:
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"{p} is neither a run folder nor a save_pretrained folder (no *.safetensors)")
            p = found[0]
    ckpt = load_checkpoint_file(p)
    if not use_ema and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    try:
        load_official_state_dict(model, extract_state_dict(ckpt))
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None
    return model


def _squeeze_mode(name: str) -> str:
    # Head matching only changes the groups (computed once); the per-sample alpha is still eq. 6.
    return "lstsq" if name == "matching" else name


def _num_tokens(model: nn.Module) -> int:
    return int(model.x_embedder.num_patches)


def _peek(it: Iterator[Any]) -> Iterator[Any]:
    yield next(it)


def _load_vae(name_or_path: str, device: torch.device) -> nn.Module:
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name_or_path)
    return vae.to(device).eval().requires_grad_(False)


def write_run_files(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Save the resolved config next to the checkpoints (for humans and for sampling)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))


def make_accelerator(cfg: ExperimentConfig, run_dir: Path, log: bool = True) -> Any:
    """An ``accelerate.Accelerator`` for this config (TensorBoard logging into the run folder)."""
    from accelerate import Accelerator

    return Accelerator(
        # Without a GPU, cpu=True makes a multi-process launch run DDP over gloo instead of
        # silently falling back to independent single processes.
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard" if log else None,
        project_dir=str(run_dir),
    )


def train(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: str = "auto",
    max_steps: int | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> Trainer:
    """Build a :class:`Trainer`, resume if asked, and train. Returns the trainer (for tests)."""
    acc = accelerator or make_accelerator(cfg, run_dir)
    if acc.is_main_process:
        write_run_files(run_dir, cfg)
    trainer = Trainer(cfg, run_dir, acc)
    trainer.resume(resume)
    if acc.log_with:
        acc.init_trackers("tensorboard", config=_flat(to_dict(cfg)))
    try:
        trainer.fit(max_steps=max_steps, progress=progress)
    finally:
        acc.end_training()
    return trainer


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # TensorBoard hparams take scalars only.
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
