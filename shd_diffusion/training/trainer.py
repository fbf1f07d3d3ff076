"""The trainer: builds the student, teacher, optimizer and EMA, runs the step and the fit loop.

The loop is step-based (no epochs) and every random draw is keyed by stream position or step
(:mod:`.streams`), so resuming needs only the checkpointed weights, EMA, optimizer, lr schedule,
head groups and step: a resumed run reproduces the uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    PreemptionHandler,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from ..cli import BadInput
from ..config import to_dict
from ..console import say
from ..data import build_dataset, make_loader
from ..diffusion import GaussianDiffusion, create_diffusion
from ..distill import FeatureProjectors
from ..families import family_of
from ..models import create_model, student_from_teacher
from ..models.loading import weights_sha256
from ..models.sources import load_model, load_weights, parse_hub_id
from ..objective import DistillationObjective, StepTerms, TrainedModules, noised, per_sample
from ..optim import EMA, build_optimizer, build_scheduler
from ..train_config import ExperimentConfig, ModelConfig
from ..vae import SD_VAE_SCALE_FACTOR, load_vae
from . import heads, previews, sharding
from .health import RunHealth
from .logs import log_interval
from .memory import check_batch_fits
from .resume import Change, check_resume
from .streams import sample_generators, step_mask_ratio_draw

__all__ = ["Trainer", "StepOutcome", "build_model", "load_model_weights"]

# Entries every training checkpoint of this package holds.
CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "scheduler", "groups", "config", "rng")


def build_model(mc: ModelConfig) -> nn.Module:
    """Instantiate a registry model with the config's overrides."""
    return create_model(mc.name, **mc.overrides())


def load_model_weights(model: nn.Module, path: str | Path, use_ema: bool = True) -> nn.Module:
    """Teacher weights from a run folder (its latest checkpoint) or any source of the one loader.

    See :func:`shd_diffusion.models.sources.load_weights` for files, folders and Hub ids; returns
    the model to use (a converted DiT for a diffusers source).
    """
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"run folder {p} has no complete checkpoint yet")
        p = latest
    return load_weights(model, p if p.exists() else str(path), use_ema=use_ema)


@dataclass
class StepOutcome:
    """What one optimizer step reports to the loop (see :meth:`Trainer.train_step`)."""

    terms: dict[str, torch.Tensor]  # name -> sum over micro-batches of the batch-mean term
    alphas: list[torch.Tensor]  # per micro-batch and SHD layer pair, (B, H_t)
    grad_norm: torch.Tensor  # total gradient norm before clipping
    images: int  # images this rank processed
    preempted: bool  # some rank received SIGTERM/SIGUSR1


class Trainer:
    """Owns one training run: models, data stream, optimizer, EMA, checkpoints and logging.

    ``self.trained`` (:class:`~shd_diffusion.objective.TrainedModules`: the student plus feature
    projectors) is the one module the optimizer steps and DDP wraps (or FSDP2 shards: :mod:`.sharding`).

    Args:
        cfg: the validated experiment config.
        run_dir: the run folder (see :func:`~shd_diffusion.training.run.run_dir_for`).
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
        student, self.teacher = self._build_models()
        if tc.grad_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
            student.enable_gradient_checkpointing()
        self.family = family_of(student)  # what is family-specific: conditioning, call, objective, extra passes
        self._check_family_options()
        self.null_class = self.family.null_class(student)
        self.drop_prob = self.family.label_dropout(student)
        if cfg.student.from_teacher and cfg.student.class_dropout_prob is not None:
            self.drop_prob = cfg.student.class_dropout_prob  # the empty-prompt probability of a text student

        # Validate layer pairs, head groups and the batch's memory before any weight I/O (errors come first).
        self.layer_pairs, self.squeezers = heads.plan_distillation(student, self.teacher, dc)
        check_batch_fits(student, self.micro_batch, world, tc, self.device)
        self.teacher_sha256: str | None = None  # the loaded teacher's content, stored in every checkpoint
        if self.teacher is not None:
            if not cfg.student.from_teacher:  # a text-to-image teacher was read whole by _build_models
                self.teacher = load_model_weights(self.teacher, cfg.teacher.checkpoint, use_ema=cfg.teacher.use_ema)
            self.teacher.eval().requires_grad_(False)
            self.teacher_sha256 = weights_sha256(self.teacher.state_dict())  # as loaded: any format, any path
        if tc.compile:
            student.compile()  # in place: parameter names (checkpoints, EMA) stay unprefixed

        projectors = None
        if dc.feature_kind == "projector":
            projectors = FeatureProjectors(
                student.config.hidden_size, self.teacher.config.hidden_size, len(self.layer_pairs)
            )
        trained = TrainedModules(student, projectors)
        # FSDP2 (see .sharding): the trained modules are sharded before the EMA and the optimizer are
        # built, so both hold this rank's shards only; the teacher stays whole and outside.
        self.sharded = sharding.fsdp_requested() and world > 1
        if self.sharded:
            sharding.check_teacher_apart(self.teacher, trained)
            trained = sharding.shard_trained(trained.to(self.device), self.device)
        self.ema = EMA(student, decay=tc.ema_decay)
        oc = cfg.optim
        optimizer = build_optimizer(trained.parameters(), oc.name, lr=oc.lr,
                                    betas=tuple(oc.betas) if oc.betas else None,
                                    weight_decay=oc.weight_decay, eps=oc.eps)
        # Stepped by hand once per optimizer step: accelerate's wrapper would step it once per
        # process, which changes what warmup_steps means with the world size.
        self.scheduler = build_scheduler(optimizer, oc.warmup_steps)
        if self.sharded:
            self.trained, self.optimizer = trained, optimizer
        else:
            self.trained, self.optimizer = accelerator.prepare(trained, optimizer)
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.ema.to(self.device)

        learn_sigma = self.family.learn_sigma(student) if self.family.learn_sigma else cfg.student.learn_sigma
        self.diffusion: GaussianDiffusion = create_diffusion(learn_sigma=learn_sigma)
        weighting = self.family.default_loss_weighting if tc.loss_weighting == "auto" else tc.loss_weighting
        self.min_snr = weighting == "min_snr5"
        self.objective = DistillationObjective(
            dc, self.diffusion, self.teacher, self.layer_pairs, family=self.family, min_snr=self.min_snr,
            drop_prob=self.drop_prob, num_tokens=heads.num_tokens(student),
            teacher_family=family_of(self.teacher) if self.teacher is not None else None)

        self._dataset = None  # built on first use (benchmarks drive compute_terms directly)
        # image_folder runs encode pixels to latents on the fly with data.vae.
        self.vae = None
        if cfg.data.kind == "image_folder":
            self.vae = load_vae(cfg.data.vae, student.config.in_channels, self.device, setting="data.vae")
        self.grid_decoder = previews.GridDecoder(cfg.data.kind, cfg.data.vae, student.config.in_channels,
                                                 self.device, self.vae)
        self.step = 0
        self.health = RunHealth(tc.healthy_factor)
        self._data_fingerprint: str | None = None
        self.resumed_from: Path | None = None
        self.resume_changes: list[Change] = []  # accepted config changes of the resume (for the history)
        self.text_previews = previews.text_previews(self)  # text-to-image validation prompts (main process)

    # ---------------------------------------------------------------- setup helpers
    def _build_models(self) -> tuple[nn.Module, nn.Module | None]:
        """The student and the teacher's architecture (None without a teacher).

        A registry student's teacher is built here and loaded after the distillation plan is
        checked. A text-to-image student (``student.name: from_teacher``) is the teacher's diffusers
        class reshaped by ``student.teacher_overrides``, so the teacher is read whole first.
        """
        cfg = self.cfg
        if not cfg.student.from_teacher:
            student = build_model(cfg.student)
            return student, (self._build_teacher() if cfg.distill.uses_teacher else None)
        self._check_teacher_source()
        teacher = load_model(cfg.teacher.checkpoint, use_ema=cfg.teacher.use_ema,
                             dtype=getattr(torch, cfg.teacher.dtype))
        student = student_from_teacher(teacher, cfg.student.init_from_teacher, **(cfg.student.teacher_overrides or {}))
        return student, (teacher if cfg.distill.uses_teacher else None)

    def _check_family_options(self) -> None:
        """Refuse training options that the student's family does not support yet (one line each)."""
        previews.check_text_settings(self)  # text-to-image previews need prompts and a pipeline

    def _check_teacher_source(self) -> None:
        """``teacher.checkpoint`` is set and names an existing path or a Hub id."""
        tcfg = self.cfg.teacher
        if tcfg.checkpoint is None:
            needs = ("student.name=from_teacher builds the student from the teacher's config" if self.cfg.student.from_teacher
                     else f"distill.mode={self.cfg.distill.mode} needs a teacher")
            raise ValueError(
                f"{needs}: set teacher.checkpoint to an official .pt file, a checkpoint of this package, a "
                "save_pretrained / diffusers folder or a Hub id"
            )
        if not Path(tcfg.checkpoint).exists() and parse_hub_id(tcfg.checkpoint) is None:
            raise FileNotFoundError(
                f"teacher.checkpoint {tcfg.checkpoint} does not exist: point it at the teacher's .pt / "
                ".safetensors file, run folder, save_pretrained / diffusers folder, or a Hub id org/repo[@rev][:path]"
            )

    def _build_teacher(self) -> nn.Module:
        """The teacher's architecture (weights are loaded after the distillation plan is checked)."""
        self._check_teacher_source()
        return build_model(self.cfg.teacher.model)

    @property
    def student(self) -> nn.Module:
        """The student, outside any DDP wrapper."""
        return self.acc.unwrap_model(self.trained).student

    @property
    def groups(self) -> list[list[list[int]]]:
        """Per SHD layer pair: one list of teacher heads per student head."""
        return [sq.resolved for sq in self.squeezers]

    def _set_groups(self, groups: list[list[list[int]]]) -> None:
        """Use these head groups from now on (head matching, or a resumed run's saved groups)."""
        self.squeezers = heads.regroup(self.squeezers, groups)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (call after :meth:`RunHealth.sync`, as :meth:`save` does).

        Sharded (FSDP): collective; every tensor is gathered whole and kept on the main process
        only, so the checkpoint has the format, names and shapes of a 1-process one (other ranks
        get a dict of Nones in its place).
        """
        trained = self.acc.unwrap_model(self.trained)
        tensors = {
            "model": trained.student.state_dict(),
            "projectors": trained.projectors.state_dict() if trained.projectors is not None else None,
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.sharded:
            tensors = sharding.full_state(tensors, keep=self.acc.is_main_process)
        return {
            "step": self.step,
            **tensors,
            "scheduler": self.scheduler.state_dict(),
            "groups": self.groups,
            "config": to_dict(self.cfg),
            "rng": capture_rng_state(),
            "health": self.health.state_dict(),
            "identity": self.identity,
        }

    @property
    def identity(self) -> dict[str, str | None]:
        """What the run depends on by content: the loaded teacher weights' hash and the data's fingerprint."""
        if self._data_fingerprint is None:
            self._data_fingerprint = self.dataset.fingerprint()
        return {"teacher_sha256": self.teacher_sha256, "data_fingerprint": self._data_fingerprint}

    def load_state_dict(self, state: dict[str, Any], name: str = "the checkpoint") -> None:
        """Restore a training checkpoint of this package, refusing one that :func:`check_resume` refuses.

        The accepted config changes are kept in ``self.resume_changes`` (for the run's history).
        """
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"not a training checkpoint of this package (no {', '.join(missing)}): --resume takes a "
                "run folder's checkpoints/step_*.pt; plain weights belong in teacher.checkpoint"
            )
        self.resume_changes = check_resume(state, self.cfg, self.identity, name)
        trained = self.acc.unwrap_model(self.trained)
        model, projectors, ema, optimizer = state["model"], state["projectors"], state["ema"], state["optimizer"]
        if self.sharded:  # full tensors (any world size wrote them) -> this rank's shards
            model = sharding.shard_like(model, trained.student.state_dict())
            if trained.projectors is not None:
                projectors = sharding.shard_like(projectors, trained.projectors.state_dict())
            ema = sharding.shard_like(ema, self.ema.state_dict())
            optimizer = sharding.shard_optimizer_state(optimizer, self.optimizer)
        trained.student.load_state_dict(model)
        if trained.projectors is not None:
            trained.projectors.load_state_dict(projectors)
        self.ema.load_state_dict(ema)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_config_lr()
        self._set_groups(state["groups"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.health.load_state_dict(state.get("health") or {})  # absent in checkpoints of older versions

    def _apply_config_lr(self) -> None:
        """Use this run's optim.lr / weight_decay / warmup, not the checkpoint's (they may change on resume).

        The loaded optimizer state carries the old lr in its param groups; without this a resume
        with a lower ``optim.lr`` (the fix after a divergence) would silently keep the old one.
        Unchanged settings give bitwise the loaded values (the same ``lr * warmup(step)`` product).
        """
        oc, sched = self.cfg.optim, self.scheduler
        sched.base_lrs = [oc.lr] * len(sched.base_lrs)
        for group, rule in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = oc.lr
            group["lr"] = oc.lr * rule(sched.last_epoch)
            group["weight_decay"] = oc.weight_decay
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr reports

    def _sync_health(self, diverged: bool = False) -> None:
        """Judge the checkpoints on the pending step records (collective: one all-reduce)."""
        self.health.sync(lambda t: self.acc.reduce(t, reduction="mean"), self.step, diverged)

    def save(self) -> Path | None:
        """Write a checkpoint from the main process (atomic; keeps the last K and the newest healthy one)."""
        self._sync_health()  # collective: every rank saves at the same steps
        self.health.unjudged.append(self.step)
        self.acc.wait_for_everyone()
        path, error = None, None
        state = self.state_dict() if self.sharded or self.acc.is_main_process else None  # sharded: collective
        if self.acc.is_main_process:
            healthy = self.health.last_healthy(self.run_dir)
            try:
                path = save_checkpoint(state, self.run_dir, self.step, self.cfg.train.keep_last,
                                       protect=[healthy[1]] if healthy else [])
            except OSError as err:  # e.g. a full disk: every rank stops, not only the writer
                error = err
        failed = self.acc.reduce(torch.tensor(float(error is not None), device=self.device), reduction="sum")
        if error is not None:
            raise error
        if float(failed) > 0:
            raise BadInput(f"the main process could not write the checkpoint of step {self.step}; "
                           "its error line names the cause")
        return path

    def release(self) -> None:
        """Drop the DDP wrapper and accelerate's references to it, before the process group goes.

        A DDP reducer that outlives ``destroy_process_group`` can abort the process at exit
        ("terminate called without an active exception"; measured with gloo under load: about
        1 launch in 9 without this, 0 in 40 with it). The student, optimizer and EMA stay usable.
        """
        self.trained = self.acc.unwrap_model(self.trained)
        self.acc.free_memory()
        gc.collect()

    def resume(self, resume: str) -> bool:
        """``resume``: "auto" (latest in the run folder, if any), "none", "step=N", or a checkpoint path.

        Only reads: checkpoints after the resumed step are set aside by
        :func:`~shd_diffusion.training.run.train` once every check has passed.
        """
        if resume == "none":
            existing = latest_checkpoint(self.run_dir)
            if existing is not None:
                raise ValueError(
                    f"--resume none, but {self.run_dir} already holds checkpoints (latest {existing.name}); a fresh "
                    "run there would mix with them. Use --resume auto to continue, or a new train.run_name"
                )
            return False
        path = resolve_resume(self.run_dir, resume)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path), path.name)
        self.resumed_from = path
        say(f"resumed from {path} at step {self.step}")
        return True

    # ---------------------------------------------------------------- data
    @property
    def dataset(self) -> Any:
        """The training dataset, built (and checked against the student) on first use."""
        if self._dataset is None:
            dc = self.cfg.data
            self.use_dataset(build_dataset(dc.kind, dc.path, dc.image_size))
        return self._dataset

    def use_dataset(self, dataset: Any) -> None:
        """Train on ``dataset`` (checked against the student first; its empty prompt feeds text CFG dropout)."""
        self.check_data_fits_student(dataset)
        self._dataset = dataset
        self.objective.empty_conditioning = getattr(dataset, "empty_conditioning", None)

    def check_data_fits_student(self, dataset: Any) -> None:
        """What the student will see (after the VAE) against what it takes: the family's check."""
        channels, side = int(dataset.in_channels), int(dataset.input_size)
        if self.vae is not None:  # pixels are encoded on the fly
            channels = int(self.vae.config.latent_channels)
            side //= 2 ** (len(self.vae.config.block_out_channels) - 1)
        problems = self.family.data_problems(self.student, dataset, channels, side)
        if problems:
            raise ValueError(f"data.kind={self.cfg.data.kind} (data.image_size={self.cfg.data.image_size}) gives the "
                             f"student " + "; ".join(problems) + ": fix the student.* or data.* settings so they agree")

    def _batches(self) -> Iterator[tuple[torch.Tensor, Any]]:
        """This rank's micro-batches from the current step on: x (B, C, H, W), y (B,) or a conditioning dict."""
        tc = self.cfg.train
        start = self.step * self.micro_batch * tc.grad_accum
        loader = make_loader(self.dataset, self.micro_batch, rank=self.acc.process_index,
                             world_size=self.acc.num_processes, seed=tc.seed, start=start,
                             num_workers=self.cfg.data.num_workers)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), _to_device(y, self.device)

    def _positions(self, micro: int, size: int) -> list[int]:
        """Global stream positions of this rank's micro-batch (the sampler deals rank::world)."""
        local = (self.step * self.cfg.train.grad_accum + micro) * self.micro_batch
        world, rank = self.acc.num_processes, self.acc.process_index
        return [(local + i) * world + rank for i in range(size)]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Pixels -> SD-VAE latents (sampled from the posterior, per-sample seeded), if a VAE is used."""
        if self.vae is None:
            return x
        dist = self.vae.encode(x).latent_dist
        noise = per_sample(gens, lambda g: torch.randn(dist.mean.shape[1:], generator=g, device=x.device))
        return (dist.mean + dist.std * noise.to(dist.mean.dtype)) * SD_VAE_SCALE_FACTOR

    # ---------------------------------------------------------------- head matching
    def _match_heads(self) -> None:
        """Head matching (paper Tab. 5): group similar teacher heads once, before the first step.

        The calibration set is the first ``distill.calibration_batches`` global batches of the
        data stream. Every rank reads the same images and so computes the same groups.
        """
        dc = self.cfg.distill
        total = dc.calibration_batches * self.cfg.train.global_batch_size
        self._set_groups(heads.calibration_groups(
            self.teacher, self.layer_pairs, self.squeezers, self._calibration_batches(total),
            chunk_size=dc.chunk_size, max_group_size=dc.max_group_size, autocast=self.acc.autocast,
        ))
        say(f"head matching on {total} calibration images: groups {self.groups}")

    def _calibration_batches(self, total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The first ``total`` stream images in micro-batches, noised: (x_t, t, y) per batch."""
        tc = self.cfg.train
        loader = make_loader(self.dataset, self.micro_batch, rank=0, world_size=1, seed=tc.seed, start=0,
                             num_workers=self.cfg.data.num_workers)
        done = 0
        while done < total:
            x, y = next(loader)
            x, y = x[: total - done].to(self.device), y[: total - done].to(self.device)  # (B, C, H, W), (B,)
            # Negative positions: generators disjoint from the training stream's.
            gens = sample_generators(tc.seed, [-1 - (done + k) for k in range(len(x))], self.device)
            t, _, x_t = noised(self.diffusion, self.encode(x, gens), gens)
            yield x_t, t, y
            done += len(x)

    # ---------------------------------------------------------------- the step
    def compute_terms(
        self, x0: torch.Tensor, y: Any, gens: list[torch.Generator], mask_ratio_draw: float = 0.5
    ) -> StepTerms:
        """Per-sample loss terms for one micro-batch (:class:`~shd_diffusion.objective.DistillationObjective`).

        Args:
            x0: (B, C, H, W) clean latents/pixels. y: (B,) labels, or a conditioning dict of (B, ...).
            gens: one generator per sample (timestep, noise, label drop, the family's extra passes: MDT keep set).
            mask_ratio_draw: for the family's extra passes (MDT's masked pass): this step's U(0, 1) mask-ratio draw
                (:func:`~shd_diffusion.training.streams.step_mask_ratio_draw`).
        """
        return self.objective(self.trained, x0, y, gens, mask_ratio_draw, self.squeezers)

    def train_step(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], preempt: Callable[[], bool] = lambda: False
    ) -> StepOutcome:
        """One optimizer step: ``train.grad_accum`` micro-batches, clip, check, update, EMA.

        A non-finite loss or gradient norm on any rank raises
        :class:`~shd_diffusion.training.health.NonFiniteLossError` before the update. The ranks
        agree on that and on ``preempt()`` (a pending SIGTERM/SIGUSR1, read after the backward
        passes) through one all-reduce, the step's only host sync.

        Args:
            batches: this rank's micro-batches ``(x (B, C, H, W), y (B,))`` (pixels or latents).
            preempt: whether this rank has seen a preemption signal.

        Returns:
            The step's summed loss terms (device tensors), alphas, grad norm, image count and
            whether any rank asked to stop.
        """
        tc = self.cfg.train
        bad_loss = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        alphas: list[torch.Tensor] = []
        images = 0
        mask_ratio_draw = step_mask_ratio_draw(tc.seed, self.step)
        for micro in range(tc.grad_accum):
            x, y = next(batches)
            gens = sample_generators(tc.seed, self._positions(micro, x.shape[0]), self.device)
            x0 = self.encode(x, gens)
            sync = (sharding.gradient_sync(self.trained, micro == tc.grad_accum - 1) if self.sharded
                    else self.acc.accumulate(self.trained))
            with sync:
                with self.acc.autocast():
                    st = self.compute_terms(x0, y, gens, mask_ratio_draw)
                    loss = st.total.mean()
                self.acc.backward(loss)  # accelerate divides by grad_accum
            bad_loss = bad_loss + (~torch.isfinite(loss.detach())).float()
            for k, v in [*st.terms.items(), ("loss", loss)]:
                terms[k] = terms.get(k, 0.0) + v.detach().float().mean()
            alphas.extend(a.detach() for a in st.alphas)
            images += x.shape[0]
        # The last micro-batch synced the gradients across ranks: clip, check, update.
        clip = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else math.inf
        if self.sharded:  # accelerate clips only the modules it prepared
            grad_norm = sharding.grad_norm_and_clip(self.trained.parameters(), clip)
        else:
            grad_norm = self.acc.clip_grad_norm_(self.trained.parameters(), clip)
        flags = torch.stack([bad_loss, (~torch.isfinite(grad_norm)).float(),
                             torch.tensor(float(preempt()), device=self.device)])  # (3,)
        bad_loss_any, bad_grad_any, preempted = (self.acc.reduce(flags, reduction="sum") > 0).tolist()
        if bad_loss_any or bad_grad_any:
            self._sync_health(diverged=True)  # collective: every rank stops at this step
            raise self.health.non_finite_error("loss" if bad_loss_any else "gradient norm", self.step, self.run_dir)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.student)
        self.step += 1
        return StepOutcome(terms, alphas, grad_norm, images, bool(preempted))

    # ---------------------------------------------------------------- the loop
    def fit(self, max_steps: int | None = None, progress: bool = True) -> dict[str, float]:
        """Train until ``train.steps`` (or ``max_steps`` more steps); returns the last logged scalars.

        Checkpoints every ``train.checkpoint_every`` steps, at the end, and when SIGTERM/SIGUSR1
        arrives (cluster preemption), then returns. A non-finite loss or gradient norm stops the
        run before the update. The ranks agree on both through one all-reduce per step, the only
        host sync of a step outside logging.
        """
        from tqdm.auto import tqdm

        tc = self.cfg.train
        end = tc.steps if max_steps is None else min(tc.steps, self.step + max_steps)
        if self.step == 0 and self.cfg.distill.squeeze == "matching" and self.layer_pairs:
            self._match_heads()
        batches = self._batches()
        bar = tqdm(total=end, initial=self.step, disable=not (progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        last: dict[str, float] = {}
        tick, seen = time.perf_counter(), 0
        sums: dict[str, torch.Tensor] = {}  # running sums since the last log, kept on the device
        alpha_stats: list[torch.Tensor] = []
        logged_at = self.step
        with PreemptionHandler() as preempt:
            while self.step < end:
                out = self.train_step(batches, lambda: preempt.requested)
                for k, v in out.terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                alpha_stats.extend(out.alphas)
                self.health.record(out.terms["loss"] / tc.grad_accum, out.grad_norm)  # the step's mean loss
                seen += out.images
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - tick
                    means = self._global_means(sums, tc.grad_accum * (self.step - logged_at))  # collective
                    last = log_interval(self.acc, self.step, means, self._gather_alphas(alpha_stats), self.layer_pairs,
                                        lr=float(self.scheduler.get_last_lr()[0]), grad_norm=out.grad_norm,
                                        img_per_s=seen * self.acc.num_processes / max(elapsed, 1e-9))
                    self._sync_health()
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    tick, seen, sums, alpha_stats, logged_at = time.perf_counter(), 0, {}, [], self.step
                saved = self.step % tc.checkpoint_every == 0 or self.step == end
                if saved:
                    path = self.save()  # collective: every rank takes the same branches here
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.sample_grid()
                if tc.figure_every and self.step % tc.figure_every == 0 and self.acc.log_with:
                    self.log_figures(self._gather_alphas(out.alphas))  # collective gather, then main only
                if out.preempted:
                    if not saved:
                        path = self.save()
                    say(f"preempted at step {self.step}: checkpoint saved{f' to {path}' if path else ''}; "
                        "rerun the same command to resume")
                    break
        bar.close()
        return last

    def _global_means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Each summed term divided by ``count`` and averaged over the ranks (one all-reduce)."""
        keys = sorted(sums)
        totals = self.acc.reduce(torch.stack([sums[k].float() for k in keys]), reduction="mean").tolist()
        return {k: v / count for k, v in zip(keys, totals)}

    def _gather_alphas(self, alphas: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per SHD layer pair, the alphas of every rank and micro-batch, (B_all, H_t) (collective)."""
        n = len(self.layer_pairs)
        if not alphas or not n:
            return []
        return [self.acc.gather(torch.cat(alphas[k::n]).float().contiguous()) for k in range(n)]

    # ---------------------------------------------------------------- previews
    def sample_grid(self, num: int = 16, steps: str = "50", cfg_scale: float = 3.8) -> Path | None:
        """An EMA sample grid in ``run_dir/samples`` (:func:`~shd_diffusion.training.previews.sample_grid`)."""
        return previews.sample_grid(self, num, steps, cfg_scale)

    def log_figures(self, alphas: list[torch.Tensor]) -> dict[str, Any]:
        """Alpha histograms and an attention panel (:func:`~shd_diffusion.training.previews.log_figures`)."""
        return previews.log_figures(self, alphas)


def _to_device(y: Any, device: torch.device) -> Any:
    """Labels (B,) or a conditioning dict of (B, ...) tensors, on ``device``."""
    if isinstance(y, dict):
        return {k: v.to(device, non_blocking=True) for k, v in y.items()}
    return y.to(device, non_blocking=True)
