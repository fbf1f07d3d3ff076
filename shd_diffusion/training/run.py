"""One training job: the run folder, the launcher checks, the run files and :func:`train`.

Everything that can be refused is checked before the first file is written; a requeued job finds
its run folder by name (never auto-incremented) and resumes itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import set_aside_later
from ..cli import BadInput, check_writable_dir
from ..config import ConfigError, dump_yaml, to_dict
from ..console import say
from ..data import DatasetError, build_dataset
from ..fileio import atomic_write_text
from ..train_config import ExperimentConfig
from .logs import flat_hparams
from .resume import append_history
from .sharding import check_fsdp_launch, fsdp_requested
from .trainer import Trainer

__all__ = ["run_dir_for", "write_run_files", "check_launch", "make_accelerator", "train", "worker_message"]

# accelerate's mixed-precision names for train.precision (fp16 is not supported: no loss scaling).
LAUNCH_PRECISION = {"fp32": "no", "bf16": "bf16"}


def run_dir_for(cfg: ExperimentConfig, config_path: str | Path | None, overrides: list[str]) -> Path:
    """Run folder named by the config (never auto-incremented), so a requeued job resumes itself.

    ``train.run_name`` wins; otherwise the config file's stem, plus a short content hash of the
    command-line overrides when there are any (two sweeps of one file get two folders).
    """
    name = cfg.train.run_name
    if name is None:
        name = Path(config_path).stem if config_path else "run"
        relevant = sorted(o for o in overrides if not o.startswith("train.run_name="))
        if relevant:
            name += "-" + hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:8]
    return Path(cfg.train.output_dir) / name


def write_run_files(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Save the resolved config next to the checkpoints (for humans and for sampling), atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))


def check_launch(cfg: ExperimentConfig) -> None:
    """Refuse launcher settings this trainer would otherwise override or not support (before any work).

    ``accelerate launch`` (and ``accelerate config``) pass their choices through the environment.
    FSDP (version 2) shards the student (:mod:`.sharding`, whose checks refuse what it cannot
    combine with); DeepSpeed is refused. A mixed precision other than ``no`` must agree with
    ``train.precision``; ``no`` is also what the launcher passes when nothing was chosen, so then
    ``train.precision`` decides.
    A dynamo backend is refused in favour of ``train.compile``.

    Raises:
        ConfigError: naming the launcher setting, the config field and the fix.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        raise ConfigError(
            "DeepSpeed was chosen in `accelerate config` or on the launch line, and this trainer does not support "
            "it: choose FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`) or multi-GPU DDP (--multi_gpu)"
        )
    if fsdp_requested():
        check_fsdp_launch(cfg)
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo != "no":
        raise ConfigError(
            f"accelerate launch --dynamo_backend {dynamo} (or `accelerate config`) would compile the DDP wrapper: "
            "launch with --dynamo_backend no and set train.compile=true (compiles the student in place, so "
            "checkpoint names stay plain)"
        )
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    wanted = LAUNCH_PRECISION[cfg.train.precision]
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
        mixed_precision=LAUNCH_PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracker,
        project_dir=str(run_dir),
    )
    # FSDP is applied by the trainer itself (.sharding), never through accelerator.prepare.
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("accelerate chose DeepSpeed, which this trainer does not support: choose FSDP2 or "
                          "multi-GPU DDP in `accelerate config`")
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
    the run folder, the models, the batch's memory and the teacher, the data, and the resumed
    checkpoint (:func:`~shd_diffusion.training.resume.check_resume`). Only then are later
    checkpoints set aside (a resume from an earlier step), the config written, this start
    appended to ``history.jsonl`` and the trackers started.
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
            trainer = Trainer(cfg, run_dir, acc)  # refuses a batch that cannot fit in memory
            trainer.use_dataset(dataset)  # checked here, not at the first step
            trainer.resume(resume)  # refuses an incompatible run folder before anything is written
        if acc.is_main_process:
            moved = set_aside_later(run_dir, trainer.step)
            if moved is not None:
                say(f"checkpoints after step {trainer.step} moved to {moved} (kept, not resumed)")
            write_run_files(run_dir, cfg)
            append_history(run_dir, trainer.step, trainer.resumed_from and trainer.resumed_from.name,
                           trainer.resume_changes, trainer.identity)
        acc.wait_for_everyone()
        if acc.log_with:
            _start_trackers(acc, cfg, run_dir)
        try:
            trainer.fit(max_steps=max_steps, progress=progress)
        except DatasetError as err:  # e.g. a corrupt image met by a DataLoader worker
            raise DatasetError(worker_message(err)) from err
        except torch.OutOfMemoryError as err:  # the estimate is a lower bound: a batch it lets through may not fit
            raise BadInput(out_of_memory_message(cfg, trainer)) from err
        # Tear down together: a rank that destroys its gloo group while a peer is still working
        # can abort in C++ ("terminate called without an active exception").
        acc.wait_for_everyone()
    finally:
        if trainer is not None:
            trainer.release()
        acc.end_training()  # also destroys the process group (one left alive aborts at exit)
    return trainer


def _start_trackers(acc: Any, cfg: ExperimentConfig, run_dir: Path) -> None:
    """TensorBoard: <run folder>/tensorboard; W&B: project shd_diffusion, run = the folder's name."""
    tensorboard = cfg.train.log_with == "tensorboard"
    acc.init_trackers("tensorboard" if tensorboard else "shd_diffusion", config=flat_hparams(to_dict(cfg)),
                      init_kwargs={} if tensorboard else {"wandb": {"name": run_dir.name, "dir": str(run_dir)}})


def out_of_memory_message(cfg: ExperimentConfig, trainer: Trainer) -> str:
    """What to do when a step ran out of GPU memory (checkpoints already written are kept)."""
    return (f"out of GPU memory at step {trainer.step + 1} with a micro-batch of {trainer.micro_batch} images "
            f"(train.global_batch_size={cfg.train.global_batch_size} / (processes x train.grad_accum="
            f"{cfg.train.grad_accum})): raise train.grad_accum or set train.grad_checkpointing=true (both may change "
            "on a resume: rerun to continue from the last checkpoint), or start a new run with a lower "
            "train.global_batch_size")


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
