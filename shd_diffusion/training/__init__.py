"""The training loop: teacher-student distillation (diffusion loss + KD + SHD) with exact resume.

Files, one room each:
  run       -- the run folder, launcher checks, run files and :func:`train` (the job)
  trainer   -- :class:`Trainer`: building the models / optimizer / EMA, the step, the fit loop
  sharding  -- FSDP2 for the student: its launcher checks, fully_shard, full state dicts
  memory    -- refusing a batch that cannot fit; the training state's bytes per GPU
  heads     -- layer pairs, head squeezers and head matching
  health    -- checkpoint health and the non-finite-loss stop
  streams   -- per-sample and per-step generators keyed by stream position
  logs      -- the interval's scalars and histograms
  previews  -- EMA sample grids and attention / alpha figures during training
  t2i_previews -- text-to-image validation prompts through the teacher's pipeline

The ``shd-train`` command line (``scripts/train_mdt_shd.py``) is :mod:`shd_diffusion.commands.train`.
"""

from ..objective import StepTerms
from .health import NonFiniteLossError, RunHealth
from .run import check_launch, make_accelerator, run_dir_for, train, worker_message, write_run_files
from .streams import sample_generators, step_mask_ratio_draw
from .trainer import StepOutcome, Trainer, build_model, load_model_weights

__all__ = [
    "Trainer",
    "StepOutcome",
    "StepTerms",
    "NonFiniteLossError",
    "RunHealth",
    "train",
    "run_dir_for",
    "write_run_files",
    "check_launch",
    "make_accelerator",
    "worker_message",
    "build_model",
    "load_model_weights",
    "sample_generators",
    "step_mask_ratio_draw",
]
