"""Teacher-student training loop: diffusion loss + KD + SHD, with exact resume.

The loop is step-based (no epochs): step ``s`` consumes stream positions ``[s G, (s + 1) G)`` of
a deterministic data stream (G = global batch). Every random draw of a sample (timestep, noise,
label drop, MDT keep set) comes from a generator keyed by ``(seed, stream position)``, and MDT's
per-step mask ratio from one keyed by ``(seed, s)``. So the result depends on neither the process
count nor the micro-batch split, and resuming needs only the checkpointed weights, EMA,
optimizer, lr schedule and step: a resumed run reproduces the uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import shd as shd_math
from .attention import attention_layers, capture_attention, capture_qk
from .checkpoint import (
    HEALTH_RECENT,
    HEALTH_WINDOW,
    CheckpointError,
    PreemptionHandler,
    capture_rng_state,
    check_resume_compatible,
    checkpoint_health,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    set_aside_later,
)
from .cli import BadInput, Diverged, check_writable_dir
from .config import ConfigError, dump_yaml, to_dict
from .fileio import atomic_path, atomic_write_text
from .data import SD_VAE_SCALE_FACTOR, DatasetError, build_dataset, make_loader
from .diffusion import GaussianDiffusion, create_diffusion
from .distill import FeatureProjectors
from .models import create_model
from .models.sources import load_weights, parse_hub_id
from .objective import DistillationObjective, StepTerms, StudentSide, noised
from .objective import per_sample as _per_sample
from .optim import EMA, build_optimizer, build_scheduler
from .train_config import SHAPE_FIELDS, ExperimentConfig, ModelConfig

__all__ = ["Trainer", "run_dir_for", "NonFiniteLossError", "StepTerms"]


class NonFiniteLossError(Diverged):
    """The loss became NaN/inf; the message names the step and the last healthy checkpoint."""


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


def step_mask_jitter(seed: int, step: int) -> float:
    """U(0, 1) draw of step ``step``'s extra MDT mask ratio, shared by every rank and micro-batch.

    Upstream draws one ratio per GPU batch; keying it to the step instead gives the whole global
    batch one ratio, so the masked pass does not depend on the process count or accumulation.
    Drawn on the CPU (no device sync).
    """
    gen = _seeded_generator(f"mask-ratio/{seed}/{step}", torch.device("cpu"))
    return float(torch.rand((), generator=gen))


def _is_mdt(model: nn.Module) -> bool:
    return type(model).__name__.startswith("MDT")


def build_model(mc: ModelConfig) -> nn.Module:
    """Instantiate a registry model with the config's overrides."""
    return create_model(mc.name, **mc.overrides())


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
            self.teacher = self._build_teacher()
        # Validate layer pairs and head groups before any weight I/O (errors come first).
        self.layer_pairs, self.squeezers = self._plan_distillation(student)
        if self.teacher is not None:
            self.teacher = load_model_weights(self.teacher, cfg.teacher.checkpoint, use_ema=cfg.teacher.use_ema)
            self.teacher.eval().requires_grad_(False)
        if tc.compile:
            student.compile()  # in place: parameter names (checkpoints, EMA) stay unprefixed

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
        self.objective = DistillationObjective(dc, self.diffusion, self.teacher, self.layer_pairs, is_mdt=self.is_mdt,
                                               min_snr=self.min_snr, drop_prob=self.drop_prob,
                                               num_tokens=_num_tokens(student))

        self._dataset = None  # built on first use (benchmarks drive compute_terms directly)
        self._grid_vae: nn.Module | None | bool = None  # latent runs: decoder of the sample grids
        self.vae = None
        if cfg.data.kind == "image_folder":
            self.vae = _load_vae(cfg.data.vae, self.device)
        self.step = 0
        # Checkpoint health (see checkpoint_health): global (step, loss, grad norm) per step.
        self._history: list[tuple[int, float, float]] = []
        self._pending: list[torch.Tensor] = []  # (2,) per step since the last host sync
        self._verdicts: dict[int, bool] = {}  # checkpoint step -> healthy
        self._unjudged: list[int] = []  # checkpoint steps whose first step on their weights is unknown

    # ---------------------------------------------------------------- setup helpers
    def _build_teacher(self) -> nn.Module:
        """The teacher's architecture (weights are loaded after the distillation plan is checked)."""
        tcfg = self.cfg.teacher
        if tcfg.checkpoint is None:
            raise ValueError(
                f"distill.mode={self.cfg.distill.mode} needs a teacher: set teacher.checkpoint to an official "
                ".pt file, a checkpoint of this package, a save_pretrained / diffusers folder or a Hub id"
            )
        if not Path(tcfg.checkpoint).exists() and parse_hub_id(tcfg.checkpoint) is None:
            raise FileNotFoundError(
                f"teacher.checkpoint {tcfg.checkpoint} does not exist: point it at the teacher's .pt / "
                ".safetensors file, run folder, save_pretrained / diffusers folder, or a Hub id org/repo[@rev][:path]"
            )
        return build_model(tcfg.model)

    def _plan_distillation(self, student: nn.Module) -> tuple[list[tuple[int, int]], list[shd_math.HeadSqueezer]]:
        """(student layer, teacher layer) pairs and, per pair, how its teacher heads are squeezed.

        Everything is validated here, before weights are loaded: token grids, head counts, the
        layer map and the head groups. Head matching starts from the default groups and replaces
        them on the first step (:meth:`_match_heads`).
        """
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
        squeezers = []
        for j, i in pairs:
            h_s, h_t = int(s_layers[j].heads), int(t_layers[i].heads)
            shd_math.validate_pair(h_s, h_t, s_tokens, t_tokens)
            squeezers.append(shd_math.HeadSqueezer(h_t, h_s, _squeeze_mode(dc.squeeze), dc.groups, dc.seed))
        return pairs, squeezers

    @property
    def groups(self) -> list[list[list[int]]]:
        """Per SHD layer pair: one list of teacher heads per student head."""
        return [sq.resolved for sq in self.squeezers]

    def _set_groups(self, groups: list[list[list[int]]]) -> None:
        """Use these head groups from now on (head matching, or a resumed run's saved groups)."""
        if len(groups) != len(self.squeezers):
            raise ValueError(
                f"{len(groups)} saved head-group layers for {len(self.squeezers)} distilled layer pairs: "
                "the checkpoint comes from another distill.student_layers / layer_map setup"
            )
        mode = _squeeze_mode(self.cfg.distill.squeeze)
        self.squeezers = [
            sq if mode in ("hard", "progressive") else
            shd_math.HeadSqueezer(sq.teacher_heads, sq.student_heads, mode, [list(g) for g in layer], sq.seed)
            for sq, layer in zip(self.squeezers, groups)
        ]

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
            "health": {"history": [list(r) for r in self._history], "verdicts": dict(self._verdicts),
                       "unjudged": list(self._unjudged), "factor": self.cfg.train.healthy_factor},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("step", "model", "ema", "optimizer", "scheduler", "groups", "config", "rng")
                   if k not in state]
        if missing:
            raise CheckpointError(
                f"not a training checkpoint of this package (no {', '.join(missing)}): --resume takes a "
                "run folder's checkpoints/step_*.pt; plain weights belong in teacher.checkpoint"
            )
        check_resume_compatible(state["config"], to_dict(self.cfg), SHAPE_FIELDS)
        side = self.acc.unwrap_model(self.side)
        side.student.load_state_dict(state["model"])
        if side.projectors is not None:
            side.projectors.load_state_dict(state["projectors"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_config_lr()
        self._set_groups(state["groups"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        health = state.get("health") or {}  # absent in checkpoints of older versions
        self._history = [(int(s), float(loss), float(g)) for s, loss, g in health.get("history", [])]
        self._verdicts = {int(k): bool(v) for k, v in health.get("verdicts", {}).items()}
        self._unjudged = [int(k) for k in health.get("unjudged", [])]

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

    def save(self) -> Path | None:
        """Write a checkpoint from the main process (atomic; keeps the last K and the newest healthy one)."""
        self._sync_health()  # collective: every rank saves at the same steps
        self._unjudged.append(self.step)
        self.acc.wait_for_everyone()
        path, error = None, None
        if self.acc.is_main_process:
            healthy = self._last_healthy()
            try:
                path = save_checkpoint(self.state_dict(), self.run_dir, self.step, self.cfg.train.keep_last,
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

    def _sync_health(self, diverged: bool = False) -> None:
        """Move the pending per-step records to the host (one all-reduce) and judge checkpoints.

        ``diverged``: this step was non-finite; it is recorded as NaN (no update was applied).
        """
        if self._pending:
            records = self.acc.reduce(torch.stack(self._pending), reduction="mean").tolist()  # (n, 2)
            first = self.step - len(records) + 1
            self._history.extend((first + k, loss, grad) for k, (loss, grad) in enumerate(records))
            self._pending = []
        if diverged:
            self._history.append((self.step + 1, math.nan, math.nan))
        factor = self.cfg.train.healthy_factor
        for step in list(self._unjudged):  # judged before trimming: a long log interval loses nothing
            verdict = checkpoint_health(self._history, step, factor)
            if verdict is not None or step < self.step - HEALTH_WINDOW:  # None this late: no stats (old file)
                self._verdicts[step] = bool(verdict)
                self._unjudged.remove(step)
        # Keep what judging the next checkpoints needs (the window before them) and the newest verdicts.
        del self._history[: max(0, len(self._history) - 2 * HEALTH_WINDOW)]
        for step in sorted(self._verdicts)[:-1000]:
            del self._verdicts[step]

    def _last_healthy(self) -> tuple[int, Path] | None:
        """(step, path) of the newest checkpoint in the run folder known to be healthy."""
        for step, path in reversed(list_checkpoints(self.run_dir)):
            if self._verdicts.get(step):
                return step, path
        return None

    def release(self) -> None:
        """Drop the DDP wrapper and accelerate's references to it, before the process group goes.

        A DDP reducer that outlives ``destroy_process_group`` can abort the process at exit
        ("terminate called without an active exception"; measured with gloo under load: about
        1 launch in 9 without this, 0 in 40 with it). The student, optimizer and EMA stay usable.
        """
        self.side = self.acc.unwrap_model(self.side)
        self.acc.free_memory()
        gc.collect()

    def resume(self, resume: str) -> bool:
        """``resume``: "auto" (latest in the run folder, if any), "none", "step=N", or a checkpoint path.

        Only reads: checkpoints after the resumed step are set aside by :func:`train` once every
        check has passed (:func:`~shd_diffusion.checkpoint.set_aside_later`).
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
        self.load_state_dict(load_checkpoint(path))
        self.print(f"resumed from {path} at step {self.step}")
        return True

    # ---------------------------------------------------------------- the step
    @property
    def dataset(self) -> Any:
        """The training dataset, built (and checked against the student) on first use."""
        if self._dataset is None:
            dc = self.cfg.data
            dataset = build_dataset(dc.kind, dc.path, dc.image_size)
            self._check_data_fits_student(dataset)
            self._dataset = dataset
        return self._dataset

    def _check_data_fits_student(self, dataset: Any) -> None:
        """Channels, grid side and classes of what the student will see (after the VAE)."""
        sc = self.acc.unwrap_model(self.side).student.config
        channels, side = int(dataset.in_channels), int(dataset.input_size)
        if self.vae is not None:  # pixels are encoded on the fly
            channels = int(self.vae.config.latent_channels)
            side //= 2 ** (len(self.vae.config.block_out_channels) - 1)
        problems = []
        if channels != sc.in_channels:
            problems.append(f"{channels} channels but student.in_channels={sc.in_channels}")
        if side != sc.input_size:
            problems.append(f"a {side} x {side} grid but student.input_size={sc.input_size} "
                            f"(data.image_size={self.cfg.data.image_size})")
        if int(dataset.num_classes) > sc.num_classes:
            problems.append(f"{dataset.num_classes} classes but student.num_classes={sc.num_classes}")
        if problems:
            raise ValueError(f"data.kind={self.cfg.data.kind} gives the student " + "; ".join(problems)
                             + ": fix the student.* or data.* settings so they agree")

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
        return (dist.mean + dist.std * noise.to(dist.mean.dtype)) * SD_VAE_SCALE_FACTOR

    def _noised(
        self, x0: torch.Tensor, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's timestep and noise (first draws of its generator), and x_t = q(x_t | x_0).

        Returns:
            t (B,), noise (B, C, H, W) and x_t (B, C, H, W), in ``x0``'s dtype.
        """
        return noised(self.diffusion, x0, gens)

    @torch.no_grad()
    def _match_heads(self) -> None:
        """Head matching (paper Tab. 5): group similar teacher heads once, before the first step.

        The calibration set is the first ``distill.calibration_batches`` global batches of the
        data stream, noised with their own per-sample generators. Every rank reads the same
        images and so computes the same groups; the teacher runs in micro-batch chunks and only
        the (H_t, H_t) head similarities are kept, so memory does not grow with the set.
        """
        dc, tc = self.cfg.distill, self.cfg.train
        total = dc.calibration_batches * tc.global_batch_size
        loader = make_loader(self.dataset, self.micro_batch, rank=0, world_size=1, seed=tc.seed, start=0,
                             num_workers=self.cfg.data.num_workers)
        t_layers = sorted({i for _, i in self.layer_pairs})
        sims: dict[int, torch.Tensor] = {}
        done = 0
        while done < total:
            x, y = next(loader)
            x, y = x[: total - done].to(self.device), y[: total - done].to(self.device)
            # Negative positions: generators disjoint from the training stream's.
            gens = sample_generators(tc.seed, [-1 - (done + k) for k in range(len(x))], self.device)
            t, _, x_t = self._noised(self._encode(x, gens), gens)
            with self.acc.autocast(), capture_qk(self.teacher, t_layers, export_values=True) as store:
                self.teacher(x_t, t, y)
            for i, q, k, bias in zip(store.layer_indices, store.queries, store.keys, store.biases):
                # (H_t, H_t), summed over the chunk; maps recomputed by row blocks, never whole
                sim = shd_math.head_similarity_qk(q, k, bias, self.cfg.distill.chunk_size)
                sims[i] = sim if i not in sims else sims[i] + sim
            done += len(x)
        self._set_groups([
            shd_math.cluster_heads(sims[i] / total, sq.student_heads, dc.max_group_size)
            for (_, i), sq in zip(self.layer_pairs, self.squeezers)
        ])
        self.print(f"head matching on {total} calibration images: groups {self.groups}")

    def compute_terms(
        self, x0: torch.Tensor, y: torch.Tensor, gens: list[torch.Generator], mask_jitter: float = 0.5
    ) -> StepTerms:
        """Per-sample loss terms for one micro-batch (:class:`~shd_diffusion.objective.DistillationObjective`).

        Objective: student diffusion loss (MDTv2: unmasked + masked pass) + kd_weight * KD +
        shd_beta * L_SHD (unmasked pass only, from captured q/k in query-row blocks) +
        feature_weight * feature term, per the mode.

        Args:
            x0: (B, C, H, W) clean latents/pixels. y: (B,) labels.
            gens: one generator per sample (timestep, noise, label drop).
            mask_jitter: MDT's masked pass: this step's mask-ratio draw (:func:`step_mask_jitter`);
                the keep sets come from ``gens``.
        """
        return self.objective(self.side, x0, y, gens, mask_jitter, self.squeezers)

    # ---------------------------------------------------------------- the loop
    def print(self, msg: str) -> None:
        """Print from the main process only."""
        if self.acc.is_main_process:
            print(msg, flush=True)

    def fit(self, max_steps: int | None = None, progress: bool = True) -> dict[str, float]:
        """Train until ``train.steps`` (or ``max_steps`` more steps); returns the last logged scalars.

        Checkpoints every ``train.checkpoint_every`` steps, at the end, and when SIGTERM/SIGUSR1
        arrives (cluster preemption), then returns. A non-finite loss or gradient norm stops the
        run before the update (:class:`NonFiniteLossError`). The ranks agree on both through one
        all-reduce per step, the only host sync of a step outside logging.
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
                # The step's mean loss and grad norm, for checkpoint health (synced with the logs).
                self._pending.append(torch.stack([out.terms["loss"] / tc.grad_accum, out.grad_norm.float()]))
                seen += out.images
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - tick
                    n_micro = tc.grad_accum * (self.step - logged_at)
                    means = self._global_means(sums, n_micro)  # collective: mean over the ranks
                    rate = seen * self.acc.num_processes / max(elapsed, 1e-9)
                    last = self._log(means, self._gather_alphas(alpha_stats), out.grad_norm, rate)
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
                    self.print(f"preempted at step {self.step}: checkpoint saved{f' to {path}' if path else ''}; "
                               "rerun the same command to resume")
                    break
        bar.close()
        return last

    def train_step(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], preempt: Callable[[], bool] = lambda: False
    ) -> StepOutcome:
        """One optimizer step: ``train.grad_accum`` micro-batches, clip, check, update, EMA.

        A non-finite loss or gradient norm on any rank raises :class:`NonFiniteLossError` before
        the update. The ranks agree on that and on ``preempt()`` (a pending SIGTERM/SIGUSR1, read
        after the backward passes) through one all-reduce, the step's only host sync.

        Args:
            batches: this rank's micro-batches ``(x (B, C, H, W), y (B,))`` (pixels or latents).
            preempt: whether this rank has seen a preemption signal.

        Returns:
            The step's summed loss terms (device tensors), alphas, grad norm, image count and
            whether any rank asked to stop.
        """
        tc = self.cfg.train
        side = self.side
        bad_loss = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        alphas: list[torch.Tensor] = []
        images = 0
        jitter = step_mask_jitter(tc.seed, self.step)
        for micro in range(tc.grad_accum):
            x, y = next(batches)
            gens = sample_generators(tc.seed, self._positions(micro, x.shape[0]), self.device)
            x0 = self._encode(x, gens)
            with self.acc.accumulate(side):
                with self.acc.autocast():
                    st = self.compute_terms(x0, y, gens, jitter)
                    loss = st.total.mean()
                self.acc.backward(loss)  # accelerate divides by grad_accum
            bad_loss = bad_loss + (~torch.isfinite(loss.detach())).float()
            for k, v in [*st.terms.items(), ("loss", loss)]:
                terms[k] = terms.get(k, 0.0) + v.detach().float().mean()
            alphas.extend(a.detach() for a in st.alphas)
            images += x.shape[0]
        # The last micro-batch synced the gradients across ranks: clip, check, update.
        clip = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else math.inf
        grad_norm = self.acc.clip_grad_norm_(side.parameters(), clip)
        flags = torch.stack([bad_loss, (~torch.isfinite(grad_norm)).float(),
                             torch.tensor(float(preempt()), device=self.device)])
        bad_loss_any, bad_grad_any, preempted = (self.acc.reduce(flags, reduction="sum") > 0).tolist()
        if bad_loss_any or bad_grad_any:
            self._raise_non_finite("loss" if bad_loss_any else "gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.acc.unwrap_model(side).student)
        self.step += 1
        return StepOutcome(terms, alphas, grad_norm, images, bool(preempted))

    def _positions(self, micro: int, size: int) -> list[int]:
        """Global stream positions of this rank's micro-batch (the sampler deals rank::world)."""
        local = (self.step * self.cfg.train.grad_accum + micro) * self.micro_batch
        world, rank = self.acc.num_processes, self.acc.process_index
        return [(local + i) * world + rank for i in range(size)]

    def _raise_non_finite(self, what: str) -> None:
        """Stop the run, naming the newest healthy checkpoint and how to resume from it."""
        self._sync_health(diverged=True)  # collective: every rank stops at this step
        healthy = self._last_healthy()
        start = -1 if healthy is None else healthy[0]
        unhealthy = [p.name for s, p in list_checkpoints(self.run_dir) if s > start]
        head = f"non-finite {what} at step {self.step}; no update was applied"
        rule = (f"healthy = losses and grad norms finite and within {self.cfg.train.healthy_factor:g}x their "
                f"running median over the {HEALTH_RECENT} steps up to it and the first step on its weights")
        if healthy is not None:
            later = f"; not healthy: {', '.join(unhealthy)}" if unhealthy else ""
            raise NonFiniteLossError(
                f"{head}. Last healthy checkpoint: {healthy[1]} ({rule}){later}. Lower optim.lr or check the data, "
                f"then resume it with --resume step={start} (later checkpoints are moved to "
                f"checkpoints/after_step_{start:08d}/, not deleted)"
            )
        held = f" (not healthy: {', '.join(unhealthy)})" if unhealthy else ""
        raise NonFiniteLossError(
            f"{head}. No checkpoint is healthy{held} ({rule}): lower optim.lr or check the data and start "
            "again in a new run folder (train.run_name)"
        )

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

    def _log(
        self, means: dict[str, float], alphas: list[torch.Tensor], grad_norm: torch.Tensor, img_per_s: float
    ) -> dict[str, float]:
        """Log the interval's mean loss terms, lr, grad norm, throughput, memory and alpha statistics.

        ``means`` are already averaged over the ranks. ``alphas`` holds one (B_all, H_t) tensor per
        SHD layer pair (:meth:`_gather_alphas`), logged as scalars and as a histogram per layer;
        ``zero_frac`` is the share of teacher heads whose alpha sits on the simplex boundary (0),
        i.e. how often the simplex constraint was active (exactly 0 for constant merge).
        """
        scalars = {f"loss/{k}": v for k, v in means.items() if k != "loss"}
        scalars["loss"] = means["loss"]
        scalars["lr"] = float(self.scheduler.get_last_lr()[0])
        scalars["throughput/img_per_s"] = img_per_s
        scalars["grad_norm"] = float(grad_norm)
        if torch.cuda.is_available():
            scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        hists = {}
        for (j, _), a in zip(self.layer_pairs, alphas):  # a: (ranks * micro-batches * B, H_t)
            scalars[f"alpha/layer{j:02d}_min"] = float(a.min())
            scalars[f"alpha/layer{j:02d}_max"] = float(a.max())
            scalars[f"alpha/layer{j:02d}_std"] = float(a.std())
            scalars[f"alpha/layer{j:02d}_zero_frac"] = float((a == 0).float().mean())
            hists[f"alpha/layer{j:02d}"] = a.cpu().numpy().reshape(-1)
        self.acc.log(scalars, step=self.step)
        if hists and self.acc.is_main_process:
            from .figures import log_histograms

            log_histograms(self.acc.trackers, hists, self.step)
        return scalars

    def _decoder(self) -> nn.Module | None | bool:
        """VAE that turns sampled latents into pixels: None for pixel-space data, False if unavailable.

        Latent runs load ``data.vae`` on first use (main process only); if that fails (e.g. no
        hub access), grids are switched off with one message instead of stopping the run.
        """
        if self.vae is not None or self.cfg.data.kind != "latents":
            return self.vae
        if self._grid_vae is None:
            try:
                self._grid_vae = _load_vae(self.cfg.data.vae, self.device)
            except (OSError, ValueError) as err:
                self.print(f"sample grids are off: cannot load data.vae={self.cfg.data.vae} to decode latents ({err})")
                self._grid_vae = False
        return self._grid_vae

    @torch.no_grad()
    def sample_grid(self, num: int = 16, steps: str = "50", cfg_scale: float = 3.8) -> Path | None:
        """Sample a preview grid with the EMA weights (CFG, ``steps`` respaced DDPM steps).

        Written to ``run_dir/samples/step_{step:08d}.png`` on the main process; returns None on
        other ranks and when latents cannot be decoded.
        """
        if not self.acc.is_main_process:
            return None
        decoder = self._decoder()
        if decoder is False:
            return None
        from torchvision.utils import save_image

        student = self.acc.unwrap_model(self.side).student
        diffusion = create_diffusion(steps, learn_sigma=self.cfg.student.learn_sigma)
        num_classes = self.null_class
        labels = torch.arange(num, device=self.device) % num_classes
        y = torch.cat([labels, torch.full_like(labels, self.null_class)])
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        shape = (num, student.config.in_channels, student.config.input_size, student.config.input_size)
        z = torch.randn(shape, generator=gen, device=self.device)
        # Upstream guides eps[:3] of the 4 latent channels; pixel-space models guide all of theirs.
        guide = 3 if student.config.in_channels > 3 else None
        with self.ema.swapped_in(student):
            was_training = student.training
            student.eval()
            x = diffusion.p_sample_loop(
                lambda x_, t_, **_: student.forward_with_cfg(
                    torch.cat([x_, x_]), torch.cat([t_, t_]), y, cfg_scale, guidance_channels=guide
                )[:num],
                z,
            )
            student.train(was_training)
        if decoder is not None:
            x = decoder.decode(x / SD_VAE_SCALE_FACTOR).sample
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_image((x.clamp(-1, 1) + 1) / 2, tmp, format="png", nrow=int(math.sqrt(num)))
        return path

    @torch.no_grad()
    def log_figures(self, alphas: list[torch.Tensor]) -> dict[str, Any]:
        """Alpha histograms per layer and a teacher / squeezed / student attention panel, to the trackers.

        ``alphas``: per SHD layer pair, the step's alphas of every rank (:meth:`_gather_alphas`).
        The panel shows one fixed image (the dataset's first item) noised to t = 500 with noise
        seeded by ``train.seed``, so successive panels differ only by the student's progress.
        Main process only (returns {} elsewhere and when nothing is distilled).

        Returns:
            The logged images, name -> uint8 (H, W, 3).
        """
        from . import figures

        if not self.acc.is_main_process or self.teacher is None or not self.layer_pairs:
            return {}
        labels = [f"student {j + 1} <- teacher {i + 1}" for j, i in self.layer_pairs]
        images = {}
        if alphas:
            heading = f"alpha per SHD layer pair at step {self.step} (batch of {alphas[0].shape[0]}, all ranks)"
            fig = figures.draw_alpha_histograms([a.cpu().numpy().reshape(-1) for a in alphas], labels,
                                                lo=0.0, hi=1.0, heading=heading)
            images["figures/alpha_histograms"] = np.asarray(fig)
        images["figures/attention"] = np.asarray(self._attention_panel(labels, figures))
        figures.log_images(self.acc.trackers, images, self.step)
        return images

    def _attention_panel(self, labels: list[str], figures: Any) -> Any:
        """One query token's attention per SHD pair: teacher heads, their squeeze, the student heads."""
        student = self.acc.unwrap_model(self.side).student
        x, y = self.dataset[0]
        x, y = x[None].to(self.device), torch.as_tensor(y).reshape(1).to(self.device)
        gens = sample_generators(self.cfg.train.seed, [-(1 << 40)], self.device)  # outside the stream
        x0 = self._encode(x, gens)
        t = torch.full((1,), 500, device=self.device)
        x_t = self.diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gens[0], device=self.device))
        keep = torch.zeros(1, dtype=torch.long, device=self.device)  # no label drop, no global RNG
        t_layers = sorted({i for _, i in self.layer_pairs})
        with capture_attention(self.teacher, 1.0, t_layers, export_values=True) as tstore:
            self.teacher(x_t, t, y, force_drop_ids=keep)
        was_training = student.training
        student.eval()
        with capture_attention(student, 1.0, [j for j, _ in self.layer_pairs]) as sstore:
            student(x_t, t, y, force_drop_ids=keep)
        student.train(was_training)
        n = tstore.probs[0].shape[-1]
        g = int(round(math.sqrt(n)))
        query = (g // 2) * g + g // 2  # the token at the grid centre
        t_rows, sq_rows, s_rows = [], [], []
        for k, ((_, i), squeezer) in enumerate(zip(self.layer_pairs, self.squeezers)):
            slot = tstore.layer_indices.index(i)
            probs = tstore.probs[slot].float()  # (1, H_t, N, N)
            squeezed, _ = squeezer(probs, tstore.values[slot].float(), tstore.out_weights[slot].float())
            t_rows.append(probs[0, :, query].cpu().numpy())  # (H_t, N)
            sq_rows.append(squeezed[0, :, query].float().cpu().numpy())  # (H_s, N)
            s_rows.append(sstore.maps[k][0, :, query].float().cpu().numpy())  # (H_s, N)
        image = figures.to_rgb_uint8(x_t[0].float().cpu())
        title = f"step {self.step}: attention of the centre token (boxed), t=500, T=1"
        return figures.draw_attention_figure(image, t_rows, sq_rows, query, title, [], student_maps=s_rows,
                                             row_labels=labels)


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


def _squeeze_mode(name: str) -> str:
    # Head matching only changes the groups (computed once); the per-sample alpha is still eq. 6.
    return "lstsq" if name == "matching" else name


def _num_tokens(model: nn.Module) -> int:
    return int(model.x_embedder.num_patches)


def _load_vae(name_or_path: str, device: torch.device) -> nn.Module:
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name_or_path)
    return vae.to(device).eval().requires_grad_(False)


def write_run_files(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Save the resolved config next to the checkpoints (for humans and for sampling), atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))


# accelerate's mixed-precision names for train.precision (fp16 is not supported: no loss scaling).
_LAUNCH_PRECISION = {"fp32": "no", "bf16": "bf16"}


def check_launch(cfg: ExperimentConfig) -> None:
    """Refuse launcher settings this trainer would otherwise override or not support (before any work).

    ``accelerate launch`` (and ``accelerate config``) pass their choices through the environment.
    FSDP and DeepSpeed are refused: checkpoints and the EMA assume every rank holds full
    parameters. A mixed precision other than ``no`` must agree with ``train.precision``; ``no`` is
    also what the launcher passes when nothing was chosen, so then ``train.precision`` decides.
    A dynamo backend is refused in favour of ``train.compile``.

    Raises:
        ConfigError: naming the launcher setting, the config field and the fix.
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"{name} was chosen in `accelerate config` or on the launch line, and this trainer does not "
                "support it yet (checkpoints and the EMA assume full parameters on every rank): choose multi-GPU "
                "DDP instead (`accelerate config`, or `accelerate launch --multi_gpu`)"
            )
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo != "no":
        raise ConfigError(
            f"accelerate launch --dynamo_backend {dynamo} (or `accelerate config`) would compile the DDP wrapper: "
            "launch with --dynamo_backend no and set train.compile=true (compiles the student in place, so "
            "checkpoint names stay plain)"
        )
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    wanted = _LAUNCH_PRECISION[cfg.train.precision]
    if launched != "no" and launched != wanted:
        fix = "set train.precision=bf16" if launched == "bf16" else "train.precision supports fp32 and bf16 only"
        raise ConfigError(
            f"accelerate launch --mixed_precision {launched} (or `accelerate config`) conflicts with "
            f"train.precision={cfg.train.precision}: {fix}, or launch with --mixed_precision {wanted}"
        )
    if cfg.train.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.log_with=wandb needs the wandb package: pip install wandb, "
                          "or set train.log_with=tensorboard / none")


def make_accelerator(cfg: ExperimentConfig, run_dir: Path, log: bool = True) -> Any:
    """An ``accelerate.Accelerator`` for this config, logging to ``train.log_with`` (unless ``log`` is False)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    tracker = cfg.train.log_with if log and cfg.train.log_with != "none" else None
    acc = Accelerator(
        # Without a GPU, cpu=True makes a multi-process launch run DDP over gloo instead of
        # silently falling back to independent single processes.
        cpu=not torch.cuda.is_available(),
        mixed_precision=_LAUNCH_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracker,
        project_dir=str(run_dir),
    )
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"accelerate chose {acc.distributed_type.value}, which this trainer does not support "
                          "yet: choose multi-GPU DDP in `accelerate config`")
    return acc


def train(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: str = "auto",
    max_steps: int | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> Trainer:
    """Build a :class:`Trainer`, resume if asked, and train. Returns the trainer (for tests).

    Everything that can be refused is checked before the first file is written: the launcher,
    the run folder, the models and the teacher, the resumed checkpoint and the data. Only then
    are later checkpoints set aside (a resume from an earlier step), the config written and the
    trackers started.
    """
    # TF32 for the float32 matmuls (SHD's squeeze; bf16 autocast covers the rest), as upstream.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    check_launch(cfg)
    check_writable_dir(run_dir, "run folder (train.output_dir / train.run_name)")
    _check_teacher_file(cfg)
    # The data's path and format first: before any model, teacher or VAE is loaded.
    dataset = build_dataset(cfg.data.kind, cfg.data.path, cfg.data.image_size)
    acc = accelerator or make_accelerator(cfg, run_dir)
    trainer = None
    try:
        with _setup_errors():
            trainer = Trainer(cfg, run_dir, acc)
            trainer.resume(resume)  # refuses an incompatible run folder before anything is written
            trainer._check_data_fits_student(dataset)  # here, not at the first step
            trainer._dataset = dataset
        if acc.is_main_process:
            moved = set_aside_later(run_dir, trainer.step)
            if moved is not None:
                trainer.print(f"checkpoints after step {trainer.step} moved to {moved} (kept, not resumed)")
            write_run_files(run_dir, cfg)
        acc.wait_for_everyone()
        if acc.log_with:  # TensorBoard: <run folder>/tensorboard; W&B: project shd_diffusion, run = folder name
            tensorboard = cfg.train.log_with == "tensorboard"
            acc.init_trackers("tensorboard" if tensorboard else "shd_diffusion", config=_flat(to_dict(cfg)),
                              init_kwargs={} if tensorboard else {"wandb": {"name": run_dir.name, "dir": str(run_dir)}})
        try:
            trainer.fit(max_steps=max_steps, progress=progress)
        except DatasetError as err:  # e.g. a corrupt image met by a DataLoader worker
            raise DatasetError(worker_message(err)) from err
        # Tear down together: a rank that destroys its gloo group while a peer is still working
        # can abort in C++ ("terminate called without an active exception").
        acc.wait_for_everyone()
    finally:
        if trainer is not None:
            trainer.release()
        acc.end_training()  # also destroys the process group (one left alive aborts at exit)
    return trainer


def worker_message(err: BaseException) -> str:
    """The error's own message, without the worker traceback a DataLoader worker wraps it in."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]  # "pkg.mod.DatasetError: <message>"
    return last.split(": ", 1)[1] if ": " in last else last


@contextlib.contextmanager
def _setup_errors() -> Iterator[None]:
    """During setup a ValueError is a refused setting or file (bad input), not a bug in the loop."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, BadInput):
            raise
        raise ConfigError(str(err)) from err


def _check_teacher_file(cfg: ExperimentConfig) -> None:
    """An empty teacher file is named here (torch's own error for it is a bare EOFError)."""
    path = cfg.teacher.checkpoint
    if cfg.distill.uses_teacher and path and Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ConfigError(f"teacher.checkpoint {path} is empty (0 bytes): point it at the teacher's .pt / "
                          ".safetensors file (an interrupted download or copy leaves such files)")


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
