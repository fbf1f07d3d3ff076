"""The demo's training runs: teacher and student configs with folders named by their content,
and "train to ``train.steps`` unless already done"."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .files import short_hash, write_json
from .settings import CONFIG_DIR, DemoError, DemoSettings
from .teacher import TEACHER_ASSET, TrainedRun, checkpoint_key, checkpoint_step

__all__ = ["TRAIN_TIME_FILE", "ensure_trained", "finished_checkpoint", "load_experiment", "run_identity",
           "student_config", "teacher_config"]

TRAIN_TIME_FILE = "demo_train_time.json"
# Fields that only say how long or where a run goes: a change resumes / reuses the same run folder.
_BOOKKEEPING = ("train.steps", "train.run_name", "train.output_dir", "train.checkpoint_every", "train.keep_last",
                "train.log_every", "train.sample_every", "data.num_workers")


def _without(tree: dict[str, Any], dotted: Sequence[str]) -> dict[str, Any]:
    """Deep copy of a config dict without the given dotted keys."""
    out = json.loads(json.dumps(tree))
    for key in dotted:
        *path, leaf = key.split(".")
        parent = out
        for part in path:
            parent = parent.get(part, {})
        parent.pop(leaf, None)
    return out


def load_experiment(config_dir: Path, name: str, overrides: Sequence[str]) -> Any:
    """The ExperimentConfig of ``config_dir/name`` with dotted ``overrides``."""
    from ..config import load_config
    from ..train_config import ExperimentConfig

    path = Path(config_dir) / name
    if not path.is_file():
        raise DemoError(f"config {path} not found: run from a checkout of the repository or pass config_dir")
    return load_config(ExperimentConfig, path, list(overrides))


def teacher_config(s: DemoSettings, out: Path, config_dir: Path = CONFIG_DIR) -> Any:
    """The teacher's ExperimentConfig, its run folder ``out/runs/teacher-<hash>`` set.

    The hash covers the whole config except step counts and bookkeeping, so more steps resume the
    same run while another architecture or lr gets a new folder.
    """
    from ..config import to_dict

    if not s.train_teacher:  # the committed teacher: the config it was trained with
        if s.teacher_overrides:
            raise DemoError("teacher overrides need --train-teacher (the committed teacher is already trained)")
        cfg = load_experiment(TEACHER_ASSET, "train_config.yaml", ())
        cfg.train.output_dir = str(TEACHER_ASSET.parent)
        cfg.train.run_name = TEACHER_ASSET.name
        return cfg
    cfg = load_experiment(config_dir, s.teacher_config, s.teacher_overrides)
    if cfg.distill.mode != "none":
        raise DemoError(f"{s.teacher_config}: the teacher trains from scratch: set distill.mode: none")
    cfg.train.output_dir = str(Path(out) / "runs")
    cfg.train.run_name = f"teacher-{short_hash(_without(to_dict(cfg), _BOOKKEEPING))}"
    return cfg


def student_config(
    s: DemoSettings, mode: str, seed: int, teacher: Any, teacher_checkpoint: Path, out: Path,
    config_dir: Path = CONFIG_DIR, overrides: Sequence[str] | None = None,
) -> Any:
    """A student's ExperimentConfig for ``mode`` and ``seed``, distilled from ``teacher_checkpoint``.

    ``mode`` names the run; ``overrides`` (default ``distill.mode=<mode>``) are what it changes on
    top of the student YAML (an ablation arm of :mod:`.study` sets several fields).
    ``teacher.model`` is copied from the teacher config (the YAML's copy is ignored), so the two can
    never disagree. The run folder ``out/runs/<mode>-s<seed>-<hash>`` hashes the config with the
    teacher checkpoint's path relative to ``out`` (:func:`run_identity`): a retrained teacher gets new students.
    """
    extra = [f"distill.mode={mode}"] if overrides is None else list(overrides)
    cfg = load_experiment(config_dir, s.student_config, [*s.student_overrides, *extra, f"train.seed={seed}"])
    cfg.teacher.model = dataclasses.replace(teacher.student)
    cfg.teacher.checkpoint = str(teacher_checkpoint)
    cfg.train.output_dir = str(Path(out) / "runs")
    cfg.train.run_name = f"{mode}-s{seed}-{short_hash(run_identity(cfg, out))}"
    return cfg


def run_identity(cfg: Any, out: Path) -> dict[str, Any]:
    """What names a student run: its config without bookkeeping, the teacher checkpoint relative to ``out``."""
    from ..config import to_dict

    key = _without(to_dict(cfg), _BOOKKEEPING)
    key["teacher"]["checkpoint"] = checkpoint_key(Path(cfg.teacher.checkpoint), out)
    return key


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The latest readable checkpoint of ``run_dir`` if it reached ``steps``, else None."""
    from ..checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir)
    return path if path is not None and checkpoint_step(path) >= steps else None


def _train_time(run_dir: Path) -> float | None:
    """Seconds the demo has spent training ``run_dir`` so far (None: trained elsewhere)."""
    path = Path(run_dir) / TRAIN_TIME_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def ensure_trained(cfg: Any, progress: bool = True) -> TrainedRun:
    """Train ``cfg`` to ``train.steps`` in its run folder, resuming, unless that is already done.

    The wall time of every session (also an interrupted one) is added to ``demo_train_time.json``
    in the run folder, so the reported train time of a resumed run is the total.

    Raises:
        DemoError: training returned before ``train.steps`` (a preemption signal): rerun to resume.
    """
    from ..checkpoint import latest_checkpoint
    from ..training import train

    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    done = finished_checkpoint(run_dir, cfg.train.steps)
    if done is None:
        t0 = time.perf_counter()
        try:
            train(cfg, run_dir, resume="auto", progress=progress)
        finally:
            total = (_train_time(run_dir) or 0.0) + time.perf_counter() - t0
            write_json(run_dir / TRAIN_TIME_FILE, {"seconds": round(total, 2)})
        latest = latest_checkpoint(run_dir)
        done = finished_checkpoint(run_dir, cfg.train.steps)
        if done is None:
            at = checkpoint_step(latest) if latest else 0
            raise DemoError(f"training of {run_dir} stopped at step {at} of {cfg.train.steps}: rerun the same command to resume")
        reused = False
    else:
        reused = True
    return TrainedRun(run_dir, done, checkpoint_step(done), _train_time(run_dir), reused)
