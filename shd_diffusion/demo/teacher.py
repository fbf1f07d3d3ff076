"""The committed demo teacher (package data): a finished run that needs no training.

``shd_diffusion/assets/demo_teacher`` is a ``save_pretrained`` folder of the EMA weights plus the
training config it was trained with (``train_config.yaml``) and ``teacher.json`` (step, sha256,
parameter count, train time). :func:`export_teacher` writes such a folder from a teacher run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_dir, os_errors_of_safetensors
from .files import relative
from .settings import DemoError

__all__ = [
    "TEACHER_ASSET",
    "TEACHER_WEIGHTS",
    "TrainedRun",
    "checkpoint_key",
    "checkpoint_step",
    "committed_teacher",
    "count_params",
    "export_teacher",
    "teacher_run_of",
]

TEACHER_ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"
TEACHER_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class TrainedRun:
    """A finished training run."""

    run_dir: Path
    checkpoint: Path
    step: int
    train_time_s: float | None  # cumulative wall time of the demo's training sessions (None: trained elsewhere)
    reused: bool
    params: int = 0


def checkpoint_step(path: Path) -> int:
    """The step of a training checkpoint ``step_{step:08d}.pt``."""
    return int(Path(path).stem.split("_", 1)[1])


def checkpoint_key(path: Path, out: Path) -> str:
    """What identifies a checkpoint in the cache keys: its path relative to ``out``, or for the
    committed teacher its weights' sha256 (so the keys do not depend on where the checkout lies)."""
    if Path(path).resolve() == TEACHER_ASSET.resolve():
        digest = hashlib.sha256((TEACHER_ASSET / TEACHER_WEIGHTS).read_bytes()).hexdigest()
        return f"committed demo teacher sha256:{digest}"
    return relative(path, out)


def count_params(checkpoint: Path) -> int:
    """Floating-point parameters of a checkpoint's EMA weights, or of a ``save_pretrained`` folder."""
    from ..checkpoint import load_checkpoint

    if Path(checkpoint).is_dir():  # a save_pretrained folder (the committed teacher): one set of weights
        from safetensors.torch import load_file

        state = load_file(str(Path(checkpoint) / TEACHER_WEIGHTS))
    else:
        state = load_checkpoint(checkpoint)["ema"]
    return int(sum(v.numel() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                   and not k.endswith("relative_position_index")))


def committed_teacher() -> TrainedRun:
    """The committed demo teacher (:data:`TEACHER_ASSET`) as a finished run; nothing is trained.

    Raises:
        DemoError: the asset is missing (a package installed without its data).
    """
    meta_path = TEACHER_ASSET / "teacher.json"
    if not (TEACHER_ASSET / TEACHER_WEIGHTS).is_file() or not meta_path.is_file():
        raise DemoError(f"the committed demo teacher is missing from {TEACHER_ASSET}: reinstall the package "
                        "from a checkout (it is package data) or train one with --train-teacher")
    meta = json.loads(meta_path.read_text())
    return TrainedRun(TEACHER_ASSET, TEACHER_ASSET, int(meta["step"]), meta["train_time_s"], True)


def teacher_run_of(checkpoint: Path) -> tuple[Path, int]:
    """The run folder and step of a teacher run's checkpoint ``RUN/checkpoints/step_N.pt``.

    Only a file that training wrote (listed by :func:`shd_diffusion.checkpoint.list_checkpoints`)
    next to its ``RUN/config.yaml`` is accepted: the export reads the run's config from there.

    Raises:
        DemoError: any other path, naming the shape expected.
    """
    from ..checkpoint import CHECKPOINT_DIR, list_checkpoints

    path = Path(checkpoint).resolve()
    shape = f"--export-teacher {checkpoint}: expected a teacher run's checkpoint RUN/{CHECKPOINT_DIR}/step_NNNNNNNN.pt"
    if not path.is_file():
        raise DemoError(f"{shape}, and there is no such file")
    run_dir = path.parent.parent
    steps = {p.resolve(): step for step, p in list_checkpoints(run_dir)} if path.parent.name == CHECKPOINT_DIR else {}
    if path not in steps:
        raise DemoError(f"{shape} as training writes it; pick one from a run folder's {CHECKPOINT_DIR}/")
    if not (run_dir / "config.yaml").is_file():
        raise DemoError(f"{shape} with RUN/config.yaml beside it; {run_dir} has none: export from the run folder itself")
    return run_dir, steps[path]


def export_teacher(checkpoint: Path, dest: Path | None = None, train_time_s: float | None = None) -> dict[str, Any]:
    """Write a teacher run's checkpoint as the committed demo teacher into ``dest`` (default
    :data:`TEACHER_ASSET`), atomically: the folder is written beside ``dest``, then swapped in.

    ``dest`` gets the EMA weights as a ``save_pretrained`` folder (``config.json`` +
    :data:`TEACHER_WEIGHTS`), the run's resolved ``config.yaml`` with ``train.steps`` set to the
    checkpoint's step (``train_config.yaml``) and ``teacher.json``: step, sha256, parameter count and
    ``train_time_s``, the wall time of the training sessions as the caller measured it (None: not
    recorded; a run folder does not keep it across resumes). Other files already in ``dest``
    (the asset's README.md) are kept.

    Returns:
        The content of ``teacher.json``.
    """
    from ..config import dump_yaml, load_config
    from ..models.sources import load_model
    from ..train_config import ExperimentConfig

    checkpoint = Path(checkpoint)
    dest = TEACHER_ASSET if dest is None else Path(dest)
    if train_time_s is not None and not (math.isfinite(train_time_s) and train_time_s >= 0):
        raise DemoError(f"--train-time must be a finite number of seconds >= 0, got {train_time_s}")
    run_dir, step = teacher_run_of(checkpoint)
    cfg = load_config(ExperimentConfig, run_dir / "config.yaml", [f"train.steps={step}"])
    if cfg.distill.mode != "none":
        raise DemoError(f"{checkpoint}: the demo teacher is trained from scratch (distill.mode none), got {cfg.distill.mode}")
    model = load_model(checkpoint, use_ema=True)
    cfg.train.output_dir, cfg.train.run_name = "runs", run_dir.name

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest, replace=True) as folder:
        with os_errors_of_safetensors(folder / TEACHER_WEIGHTS):  # a full disk: one error line, not a traceback
            model.save_pretrained(str(folder), safe_serialization=True)  # config.json + TEACHER_WEIGHTS
        (folder / "train_config.yaml").write_text(dump_yaml(cfg))
        meta = {
            "step": step,
            "source": relative(checkpoint, Path.cwd()),
            "train_time_s": None if train_time_s is None else round(float(train_time_s), 1),
            "weights_sha256": hashlib.sha256((folder / TEACHER_WEIGHTS).read_bytes()).hexdigest(),
            "params": count_params(folder),
        }
        (folder / "teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
        for kept in dest.iterdir() if dest.is_dir() else ():  # files this export does not write (README.md)
            if kept.is_file() and not (folder / kept.name).exists():
                shutil.copy2(kept, folder / kept.name)
    return meta
