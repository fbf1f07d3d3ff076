"""What a demo ``--size`` fixes: the settings dataclass, the presets, and their validation."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli import BadInput

__all__ = ["CONFIG_DIR", "DEFAULT_INCEPTION_WEIGHTS", "DemoError", "DemoSettings", "SIZES", "resolve_settings"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # <repo>/configs in a checkout
DEFAULT_INCEPTION_WEIGHTS = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shd_diffusion" / "inception" / "inception_fid_helper.pth"
)


class DemoError(BadInput, RuntimeError):
    """The demo cannot continue; the message names the problem and the fix."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything a ``--size`` fixes besides the training YAMLs (which hold models, steps, batch)."""

    size: str  # preset name
    teacher_config: str  # YAML under configs/ for the teacher run (distill.mode none)
    student_config: str  # YAML under configs/ for the student runs (mode set per run)
    teacher_overrides: tuple[str, ...] = ()  # dotted overrides on top of teacher_config
    student_overrides: tuple[str, ...] = ()  # dotted overrides on top of student_config
    train_teacher: bool = False  # False: the committed teacher (TEACHER_ASSET); True: train teacher_config
    modes: tuple[str, ...] = ("none", "kd", "kd_shd")  # distill.mode of each student
    seeds: tuple[int, ...] = (0,)  # train.seed of each student (init, data order, noise)
    num_samples: int = 250  # images sampled per student (labels i % 10)
    num_ref: int = 500  # reference images from the training set (0 = all 10,000)
    sampling_steps: int = 50  # respaced DDPM steps
    cfg_scale: float = 3.8  # classifier-free guidance scale (paper: 3.8)
    guidance_schedule: str = "auto"  # auto = MDTv2's power-cosine, DiT's constant
    sample_seed: int = 0  # base seed of the per-index sampling seeds (same for every run: paired noise)
    sample_batch_size: int = 125  # images per sampling batch (the model sees 2x with CFG)
    shard_size: int = 250  # images per sample shard (the unit of resume)
    inception_batch_size: int = 50  # images per Inception forward
    kid_subsets: int = 100  # KID: random subsets
    kid_subset_size: int = 1000  # KID: subset size (the demo caps it at the smaller set; the scorer refuses more)
    alpha_batch: int = 64  # teacher batch for the alpha histograms
    attention_timestep: int = 100  # t of the noisy image whose attention maps are drawn
    grid_images: int = 100  # images per sample grid (10 per row: column = class)


SIZES: dict[str, DemoSettings] = {
    # 2 CPU cores: the committed teacher, 3 students x 600 steps, 4 x 250 samples, 500 refs.
    "cpu": DemoSettings(size="cpu", teacher_config="demo_teacher.yaml", student_config="demo_student.yaml"),
    # One GPU, hours: teacher to convergence, 3 seeds per mode, 5k samples, FID against all 10k images.
    "gpu": DemoSettings(
        size="gpu",
        teacher_config="demo_gpu_teacher.yaml",
        train_teacher=True,  # 256 tokens: the committed teacher has 64
        student_config="demo_gpu_student.yaml",
        seeds=(0, 1, 2),
        num_samples=5000,
        num_ref=0,
        sampling_steps=250,
        sample_batch_size=500,
        shard_size=1000,
        inception_batch_size=250,
        alpha_batch=256,
    ),
    # One ~9-minute GPU call (benchmarks/gpu_study.sh): 256 tokens, 12 -> 6 heads, teacher trained in
    # the same command, 2 seeds per mode, 2,000 samples per run against all 10,000 images.
    "study": DemoSettings(
        size="study",
        teacher_config="demo_study_teacher.yaml",
        student_config="demo_study_student.yaml",
        train_teacher=True,  # 256 tokens: the committed teacher has 64
        seeds=(0, 1),
        num_samples=2000,
        num_ref=0,
        sample_batch_size=1000,
        shard_size=1000,
        inception_batch_size=500,
        alpha_batch=256,
    ),
    # Smoke test (tests/test_demo.py): microscopic models, 2 steps, 10 samples, 3 sampling steps.
    "tiny": DemoSettings(
        size="tiny",
        teacher_config="demo_teacher.yaml",
        train_teacher=True,
        student_config="demo_student.yaml",
        teacher_overrides=(
            "student.patch_size=8", "student.hidden_size=24", "student.depth=4", "student.decode_layer=2",
            "train.steps=2", "train.global_batch_size=4", "train.checkpoint_every=1", "train.log_every=1",
        ),
        student_overrides=(
            "student.patch_size=8", "student.hidden_size=12", "student.depth=2", "student.decode_layer=0",
            "train.steps=2", "train.global_batch_size=4", "train.checkpoint_every=1", "train.log_every=1",
        ),
        num_samples=10,
        num_ref=10,
        sampling_steps=3,
        sample_batch_size=5,
        shard_size=5,
        inception_batch_size=10,
        kid_subsets=10,
        alpha_batch=4,
        grid_images=10,
    ),
}


def resolve_settings(size: str = "cpu", **changes: Any) -> DemoSettings:
    """The preset ``size`` with ``changes`` applied (None values keep the preset's).

    Raises:
        DemoError: unknown size, mode or setting, or a value out of range.
    """
    if size not in SIZES:
        raise DemoError(f"unknown --size {size!r}: use one of {', '.join(SIZES)}")
    known = {f.name for f in dataclasses.fields(DemoSettings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise DemoError(f"unknown demo setting(s) {unknown}; known: {sorted(known)}")
    s = dataclasses.replace(SIZES[size], **{k: v for k, v in changes.items() if v is not None})
    _check(s)
    return s


# Settings counted in images, steps or subsets: each must be at least 1.
_COUNTS = ("num_samples", "sampling_steps", "sample_batch_size", "shard_size", "inception_batch_size", "kid_subsets",
           "kid_subset_size", "alpha_batch", "grid_images")
MAX_SEED = 2**63  # seeds are int64 (torch generators, the per-index seed hash)


def _check(s: DemoSettings) -> None:
    """Refuse every setting that is wrong on its own, in the words of the demo's flags (before any work).

    Raises:
        DemoError: naming the setting, the value and the allowed range.
    """
    from ..sampler import DIFFUSION_STEPS, GUIDANCE_SCHEDULES
    from ..train_config import MODES

    bad = [m for m in s.modes if m not in MODES]
    if bad or not s.modes:
        raise DemoError(f"--modes {','.join(s.modes)}: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if len(set(s.modes)) != len(s.modes) or len(set(s.seeds)) != len(s.seeds) or not s.seeds:
        raise DemoError(f"--modes and --seeds must be non-empty and without repeats, got {s.modes} / {s.seeds}")
    for name, value in [*((f, getattr(s, f)) for f in _COUNTS), ("num_ref", s.num_ref), ("sample_seed", s.sample_seed),
                        ("attention_timestep", s.attention_timestep), *(("seeds", v) for v in s.seeds)]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DemoError(f"{_flag(name)} must be an integer, got {value!r}")
    for name in _COUNTS:
        if getattr(s, name) < 1:
            raise DemoError(f"{_flag(name)} must be >= 1, got {getattr(s, name)}")
    if s.sampling_steps > DIFFUSION_STEPS:
        raise DemoError(f"--sampling-steps {s.sampling_steps}: respacing keeps at most the models' {DIFFUSION_STEPS} steps")
    if not 0 <= s.attention_timestep < DIFFUSION_STEPS:
        raise DemoError(f"attention_timestep must be in [0, {DIFFUSION_STEPS}), got {s.attention_timestep}")
    for name, seed in [("sample_seed", s.sample_seed), *(("seeds", v) for v in s.seeds)]:
        if not 0 <= seed < MAX_SEED:
            raise DemoError(f"{_flag(name)} must be in [0, 2^63), got {seed}")
    # Precision/recall needs k + 1 = 4 images on each side; FID's covariance 2.
    if s.num_samples < 4 or s.num_ref < 0 or 0 < s.num_ref < 4:
        raise DemoError(f"need >= 4 samples and >= 4 reference images (0 = all; precision/recall k=3), "
                        f"got {s.num_samples} / {s.num_ref}")
    if isinstance(s.cfg_scale, bool) or not isinstance(s.cfg_scale, (int, float)) or not math.isfinite(s.cfg_scale) \
            or s.cfg_scale < 1.0:
        raise DemoError(f"--cfg-scale must be a finite number >= 1 (1 = no guidance), got {s.cfg_scale}")
    if s.guidance_schedule not in GUIDANCE_SCHEDULES:
        raise DemoError(f"guidance_schedule {s.guidance_schedule!r}: use auto, constant or power-cosine")


def _flag(name: str) -> str:
    """How the user set a setting: its command-line flag, or the setting's own name."""
    flags = {"num_samples": "--num-samples", "num_ref": "--num-ref", "sampling_steps": "--sampling-steps",
             "cfg_scale": "--cfg-scale", "seeds": "--seeds"}
    return flags.get(name, name)
