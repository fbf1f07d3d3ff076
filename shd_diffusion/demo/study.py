"""The paper's ablations on the demo, with seed spread: ``python scripts/demo.py --study ablations``.

Every arm (:data:`ARMS`: KD + SHD against no distillation, plain KD, the other squeeze rules, feature
distillation, MSE, T_a = 1 and other betas) distils the demo student from the same teacher with
each seed; seeds are paired across arms (same init, data order and noise per seed; the same
sampling noise for every run). Each run is scored at a quarter, half and all of its steps, so the
report shows whether a lead is an early-convergence effect.

Resumable at two levels: the work folder (``--out``) keeps runs, samples and scores as the demo
does; the report folder (``--report``) keeps one small JSON per finished run, written as soon as it
is scored. A rerun, also on another machine with only the report folder, skips every run whose
record matches its key (run config hash, evaluation steps, sampling and scoring settings) and
rewrites the report from all records: ``report.md``, ``results.json``, ``fid_vs_steps.png`` and
the teacher's per-head alpha figure.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..console import say
from ..figures import CURVE_COLOURS, Curve, draw_curves, save_png
from .analysis import FIGURE_FILES, attention_and_alpha_figures
from .files import write_json, write_text
from .pipeline import (
    Stages,
    ensure_samples,
    ensure_scores,
    preflight,
    reference_and_weights_stages,
    teacher_checkpoint_path,
    teacher_scores,
    teacher_stage,
)
from .report import device_name
from .runs import ensure_trained, load_experiment, run_identity, student_config, teacher_config
from .settings import CONFIG_DIR, DemoError, DemoSettings, resolve_settings
from .teacher import count_params

__all__ = ["ARMS", "STUDIES", "STUDY_SEEDS", "STUDY_SETTINGS", "STUDY_STEPS", "Arm", "describe_study", "run_study", "study_configs",
           "study_settings", "write_study_report"]

STUDIES = ("ablations",)
REFERENCE_ARM = "kd_shd"  # the method; every other arm is compared with it seed by seed


@dataclass(frozen=True)
class Arm:
    """One ablation: what it changes on top of the student YAML, and where the paper reports it."""

    title: str
    overrides: tuple[str, ...]
    paper: str


_SHD = ("distill.mode=kd_shd",)
ARMS: dict[str, Arm] = {
    "none": Arm("no distillation", ("distill.mode=none",), "baseline"),
    "kd": Arm("KD (output matching)", ("distill.mode=kd",), "Tab. 5 'simple KD'"),
    "kd_shd": Arm("KD + SHD (the method)", _SHD, "Tab. 5"),
    "kd_constant": Arm("KD + constant merge (alpha = 1/g)", (*_SHD, "distill.squeeze=constant"), "Tab. 8"),
    "kd_hard": Arm("KD + hard selection (one head per group)", (*_SHD, "distill.squeeze=hard"), "Tab. 7"),
    "kd_matching": Arm("KD + head matching (clustered groups)", (*_SHD, "distill.squeeze=matching"), "Tab. 5"),
    "kd_progressive": Arm("KD + progressive merging", (*_SHD, "distill.squeeze=progressive"), "Tab. 5"),
    "kd_feat": Arm("KD + feature distillation (projector)", ("distill.mode=kd_feat",), "Tab. 5"),
    "kd_selfcorr": Arm("KD + feature distillation (self-correlation)", ("distill.mode=kd_selfcorr",), "Tab. 5"),
    "kd_shd_mse": Arm("KD + SHD, MSE instead of KL", (*_SHD, "distill.loss=mse"), "Tab. 10"),
    "kd_shd_t1": Arm("KD + SHD, T_a = 1", (*_SHD, "distill.temperature=1.0"), "Tab. 6"),
    "kd_shd_beta0.1": Arm("KD + SHD, beta 0.1", (*_SHD, "distill.shd_beta=0.1"), "Tab. 6"),
    "kd_shd_beta1": Arm("KD + SHD, beta 1", (*_SHD, "distill.shd_beta=1.0"), "Tab. 6"),
    "kd_shd_beta2": Arm("KD + SHD, beta 2 (the paper's)", (*_SHD, "distill.shd_beta=2.0"), "Tab. 6"),
}
# The figure's two panels: the rival methods, and the variants of SHD's own settings.
_PANELS = {
    "methods": ("none", "kd", "kd_shd", "kd_constant", "kd_hard", "kd_matching", "kd_progressive", "kd_feat", "kd_selfcorr"),
    "SHD settings": ("kd", "kd_shd", "kd_shd_mse", "kd_shd_t1", "kd_shd_beta0.1", "kd_shd_beta1", "kd_shd_beta2"),
}
# Student steps per demo size (None: the student YAML's). The CPU size is sized to ~2 h (docs/demo.md).
STUDY_STEPS: dict[str, int | None] = {"cpu": 400, "gpu": None, "study": None, "tiny": 4}
STUDY_SEEDS: dict[str, tuple[int, ...]] = {"cpu": (0, 1, 2), "gpu": (0, 1, 2), "study": (0, 1, 2), "tiny": (0,)}
# Demo settings the study changes per size. CPU: 126 scored checkpoints; Inception costs ~0.1-0.2 s
# per image on 2 cores, so 100 samples each (the demo: 250) keeps scoring near 40 min.
STUDY_SETTINGS: dict[str, dict[str, Any]] = {"cpu": {"num_samples": 100}}
EVAL_FRACTIONS = (4, 2, 1)  # scored at steps / 4, steps / 2 and steps


def study_settings(size: str, **changes: Any) -> DemoSettings:
    """The demo preset ``size`` with the study's seeds and sizes (:data:`STUDY_SEEDS`, :data:`STUDY_SETTINGS`),
    then ``changes`` (None values keep those).

    Raises:
        DemoError: unknown size or setting, or a value out of range (:func:`~.settings.resolve_settings`).
    """
    defaults = {"seeds": STUDY_SEEDS.get(size, (0,)), **STUDY_SETTINGS.get(size, {})}
    return resolve_settings(size, **{**defaults, **{k: v for k, v in changes.items() if v is not None}})


def _steps(s: DemoSettings, config_dir: Path) -> int:
    """Student steps of the study at size ``s``: a multiple of 4, so its checkpoints land on the quarters."""
    steps = STUDY_STEPS.get(s.size)
    if steps is None:
        steps = load_experiment(config_dir, s.student_config, s.student_overrides).train.steps
    if steps % 4:
        raise DemoError(f"the study scores each run at a quarter, half and all of its steps: {steps} student steps "
                        "is not a multiple of 4 (set train.steps in the student config to one)")
    return steps


def study_configs(
    s: DemoSettings, arms: Sequence[str], steps: int, teacher_cfg: Any, teacher_checkpoint: Path, out: Path,
    config_dir: Path = CONFIG_DIR,
) -> dict[tuple[str, int], Any]:
    """Every (arm, seed) student config, seed-major (a cut-off study has whole seeds first).

    Checkpoints every ``steps / 4`` and keeps all four, the ones the evaluation reads.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise DemoError(f"unknown ablation arm(s) {unknown}: choose from {', '.join(ARMS)}")
    bookkeeping = (f"train.steps={steps}", f"train.checkpoint_every={steps // 4}", "train.keep_last=4")
    return {(arm, seed): student_config(s, arm, seed, teacher_cfg, teacher_checkpoint, out, config_dir,
                                        overrides=(*ARMS[arm].overrides, *bookkeeping))
            for seed in s.seeds for arm in arms}


def describe_study(s: DemoSettings, arms: Sequence[str] | None, out: Path, config_dir: Path = CONFIG_DIR) -> str:
    """The study's plan as text (``--dry-run``): arms, overrides, steps and the run count; every
    arm's config is built, so a bad arm or override is refused here."""
    arms = tuple(arms or ARMS)
    tcfg = teacher_config(s, Path(out), Path(config_dir))
    steps = _steps(s, Path(config_dir))
    configs = study_configs(s, arms, steps, tcfg, teacher_checkpoint_path(s, tcfg, Path(out)), Path(out), Path(config_dir))
    lines = [f"# study ablations: {len(arms)} arms x seeds {list(s.seeds)} = {len(configs)} runs of {steps} steps, "
             f"each scored at steps {_eval_steps(steps)} with {s.num_samples} samples ({s.sampling_steps} DDPM steps) "
             f"against {s.num_ref or 'all'} reference images"]
    for arm in arms:
        run = configs[arm, s.seeds[0]].train.run_name
        lines.append(f"{arm:16s} {ARMS[arm].title}; overrides {' '.join(ARMS[arm].overrides)}; run {run}")
    return "\n".join(lines)


def _eval_steps(steps: int) -> list[int]:
    return [steps // f for f in EVAL_FRACTIONS]


def _run_key(cfg: Any, s: DemoSettings, steps: int, ref_path: Path, weights: Any) -> dict[str, Any]:
    """What a run record stands for: when any of it changes, the run is redone."""
    return {"run": cfg.train.run_name, "eval_steps": _eval_steps(steps), "num_samples": s.num_samples,
            "sampling_steps": s.sampling_steps, "cfg_scale": s.cfg_scale, "guidance_schedule": s.guidance_schedule,
            "sample_seed": s.sample_seed, "reference": Path(ref_path).name, "inception_sha256": weights.sha256}


def _evaluate(run: Any, s: DemoSettings, steps: int, out: Path, dev: Any, ref_path: Path, weights: Any,
              progress: bool) -> list[dict[str, Any]]:
    """Sample and score the run's checkpoints at the evaluation steps."""
    from ..checkpoint import list_checkpoints

    found = dict(list_checkpoints(run.run_dir))
    rows = []
    for step in _eval_steps(steps):
        if step not in found:
            raise DemoError(f"{run.run_dir}: no checkpoint at step {step} (the study keeps steps/4, /2, /1); "
                            "delete the run folder and rerun to train it again")
        t0 = time.perf_counter()
        samples, _ = ensure_samples(found[step], run.run_dir.name, s, out, dev, progress)
        t1 = time.perf_counter()
        report, _ = ensure_scores(samples, ref_path, weights, s, out, progress)
        rows.append({"step": step, "fid": report["fid"], "kid_mean": report["kid_mean"], "kid_std": report["kid_std"],
                     "precision": report["precision"], "recall": report["recall"],
                     "sample_s": round(t1 - t0, 2), "score_s": round(time.perf_counter() - t1, 2)})
    return rows


def _load_record(path: Path, key: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """The run record at ``path`` if it exists and stands for ``key`` and the run config ``config``
    (:func:`~.runs.run_identity`).

    A run's name hashes its whole config, so a config field added to the schema since renames every
    run. A record whose name no longer matches still counts when its other settings equal ``key`` and
    its saved config differs from ``config`` in no field (:func:`~shd_diffusion.config.changed_fields`:
    a field it lacks must hold its default now).
    """
    from ..config import changed_fields, to_dict
    from ..train_config import ExperimentConfig

    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record is redone
    if not isinstance(record, dict):
        return None
    if record.get("key") == key:
        return record

    def settings(k: Any) -> dict[str, Any]:
        return {n: v for n, v in k.items() if n != "run"} if isinstance(k, dict) else {}

    saved = record.get("config")
    if settings(record.get("key")) != settings(key) or not isinstance(saved, dict):
        return None
    return record if not changed_fields(saved, config, to_dict(ExperimentConfig())) else None


def _machine(dev: Any) -> str:
    """CPU model and the device as the report names it."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}; {device_name(dev)}"


def run_study(
    s: DemoSettings, study: str = "ablations", arms: Sequence[str] | None = None,
    out: str | Path = "results/ablations", report_dir: str | Path | None = None,
    inception_weights: str | Path | None = None, device: str = "auto", progress: bool = True,
    config_dir: str | Path = CONFIG_DIR, command: str = "",
) -> dict[str, Any]:
    """Run (or finish) the ablation study and write its report (module docstring).

    Args:
        s: demo settings (size, seeds, sampling, scoring); ``s.modes`` is not used.
        arms: subset of :data:`ARMS` (None = all, in table order).
        out: work folder (runs, samples, scores). report_dir: run records and report (None = out/report).
        command: the command line, as the report quotes it.

    Returns:
        The content of ``results.json``.
    """
    if study not in STUDIES:
        raise DemoError(f"unknown --study {study!r}: choose from {', '.join(STUDIES)}")
    out, config_dir = Path(out), Path(config_dir)
    report_dir = Path(report_dir) if report_dir is not None else out / "report"
    arms = tuple(arms or ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise DemoError(f"unknown ablation arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if REFERENCE_ARM not in arms:
        raise DemoError(f"the study compares every arm with {REFERENCE_ARM}: keep it in --arms")
    from ..cli import check_writable_dir

    check_writable_dir(report_dir, "--report")
    dev, tcfg = preflight(s, out, inception_weights, device, config_dir, students=False)
    steps = _steps(s, config_dir)
    # Every arm's config (the report covers all recorded arms); ``arms`` picks the ones run now.
    configs = study_configs(s, tuple(ARMS), steps, tcfg, teacher_checkpoint_path(s, tcfg, out), out, config_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    say(f"study {study}: {len(arms)} arms x seeds {list(s.seeds)} = {len(arms) * len(s.seeds)} runs of {steps} steps, "
        f"scored at steps {_eval_steps(steps)} with {s.num_samples} samples; work {out}, report {report_dir}", "study")
    teacher = teacher_stage(s, tcfg, stages, progress)
    ref_path, ref_idx, _, weights = reference_and_weights_stages(s, tcfg, out, inception_weights, stages)

    def record_path(arm: str, seed: int) -> Path:
        return report_dir / "runs" / f"{arm}-s{seed}.json"

    keys = {k: _run_key(c, s, steps, ref_path, weights) for k, c in configs.items()}
    identities = {k: run_identity(c, out) for k, c in configs.items()}
    records = {k: r for k in configs if (r := _load_record(record_path(*k), keys[k], identities[k])) is not None}
    todo = [k for k in configs if k[0] in arms and k not in records]
    say(f"{len(records)} runs already recorded in {report_dir / 'runs'}; {len(todo)} to do", "study")
    done_now: list[float] = []
    for n, (arm, seed) in enumerate(todo):
        t0 = time.perf_counter()
        with stages(f"{arm} seed {seed}"):
            run = ensure_trained(configs[arm, seed], progress)
            evals = _evaluate(run, s, steps, out, dev, ref_path, weights, progress)
        record = {"arm": arm, "seed": seed, "key": keys[arm, seed], "steps": run.step, "train_time_s": run.train_time_s,
                  "params": count_params(run.checkpoint), "evals": evals, "machine": _machine(dev),
                  "wall_s": round(time.perf_counter() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "config": identities[arm, seed]}
        write_json(record_path(arm, seed), record)
        records[arm, seed] = record
        done_now.append(record["wall_s"])
        left = len(todo) - n - 1
        fids = ", ".join(f"{e['fid']:.1f}" for e in evals)
        say(f"{arm} seed {seed}: FID {fids} at steps {_eval_steps(steps)}; {left} runs left, "
            f"about {left * float(np.mean(done_now)) / 60:.0f} min", "study")
        write_study_report(report_dir, records, s, steps, configs[arm, seed], {"command": command, "partial": True})

    with stages("teacher scores"):
        teacher_row = teacher_scores(teacher, s, out, dev, ref_path, weights, stages, progress)
    with stages("alpha figure"):
        figs, _ = attention_and_alpha_figures(teacher, tcfg, configs[REFERENCE_ARM, s.seeds[0]], ref_idx, s, out, dev)
        shutil.copyfile(out / "figures" / FIGURE_FILES["alphas"], report_dir / "alpha_per_head.png")
    if not todo:  # a rerun that only rewrote the report: quote the command that made the runs
        command = _previous_command(report_dir) or command
    extra = {"command": command, "partial": len(records) < len(configs), "machine": _machine(dev),
             "wall_time_this_invocation_s": round(stages.elapsed(), 1), "runs_this_invocation": len(todo),
             "teacher": {k: teacher_row[k] for k in ("fid", "precision", "recall", "kid_mean")},
             "alpha_stats": figs["alpha_stats"], "groups": figs["groups"], "date": time.strftime("%Y-%m-%d")}
    return write_study_report(report_dir, records, s, steps, configs[REFERENCE_ARM, s.seeds[0]], extra)


# ------------------------------------------------------------------------------------------ report


def _previous_command(report_dir: Path) -> str | None:
    """The command quoted by the report already in ``report_dir`` (None: none readable)."""
    try:
        command = json.loads((report_dir / "results.json").read_text()).get("command")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return command if isinstance(command, str) and command else None


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value) and n."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None,
            "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def _pm(st: dict[str, Any], digits: int = 1, scale: float = 1.0) -> str:
    if st["mean"] is None:
        return "–"
    text = f"{st['mean'] * scale:.{digits}f}"
    return text + (f" ± {st['std'] * scale:.{digits}f}" if st["std"] is not None else "") + f" (n={st['n']})"


def _metric(records: dict[tuple[str, int], dict[str, Any]], arm: str, step: int, name: str) -> dict[int, float]:
    """seed -> value of ``name`` at ``step`` for ``arm`` (runs that have it)."""
    out = {}
    for (a, seed), r in records.items():
        for e in r["evals"]:
            if a == arm and e["step"] == step and e[name] is not None:
                out[seed] = float(e[name])
    return out


def summarise(records: dict[tuple[str, int], dict[str, Any]], arms: Sequence[str], steps: int) -> dict[str, Any]:
    """Per arm and evaluation step: FID (and at the end KID, precision, recall) mean ± std over
    seeds; per arm: the paired per-seed FID differences against :data:`REFERENCE_ARM`."""
    evals = _eval_steps(steps)
    table, paired = {}, {}
    for arm in arms:
        table[arm] = {str(st): _stats(list(_metric(records, arm, st, "fid").values())) for st in evals}
        for name in ("kid_mean", "precision", "recall"):
            table[arm][name] = _stats(list(_metric(records, arm, steps, name).values()))
        if arm == REFERENCE_ARM:
            continue
        paired[arm] = {}
        for st in evals:
            ref, other = _metric(records, REFERENCE_ARM, st, "fid"), _metric(records, arm, st, "fid")
            seeds = sorted(set(ref) & set(other))
            diffs = [other[sd] - ref[sd] for sd in seeds]  # > 0: the reference arm is better
            paired[arm][str(st)] = {**_stats(diffs), "per_seed": dict(zip(map(str, seeds), diffs)),
                                    "reference_better": sum(d > 0 for d in diffs)}
    return {"fid": table, "paired_vs_" + REFERENCE_ARM: paired}


def _figure(summary: dict[str, Any], arms: Sequence[str], steps: int, path: Path) -> None:
    """FID against student steps, one line per arm (band = ± one std over seeds), two panels."""
    colour = {a: CURVE_COLOURS[i % len(CURVE_COLOURS)] for i, a in enumerate(ARMS)}
    xs = _eval_steps(steps)
    panels = []
    for title, members in _PANELS.items():
        curves = []
        for arm in (a for a in members if a in arms):
            st = [summary["fid"][arm][str(x)] for x in xs]
            mean = [v["mean"] if v["mean"] is not None else math.nan for v in st]
            spread = [v["std"] if v["std"] is not None else 0.0 for v in st]
            curves.append(Curve(arm, xs, mean, [m - d for m, d in zip(mean, spread)],
                                [m + d for m, d in zip(mean, spread)], colour[arm]))
        panels.append((title, curves))
    save_png(draw_curves(panels, "student steps", "FID", heading="FID against student steps: mean over seeds, "
                         "band = ± one std (paired seeds, same sampling noise)"), path)


def _markdown(res: dict[str, Any]) -> str:
    """report.md: the tables, the paired differences, the figures, how it was made."""
    steps, arms, summ = res["steps"], res["arms"], res["summary"]
    evals = _eval_steps(steps)
    lines = [f"# Ablations on the demo: {len(arms)} arms x {len(res['seeds'])} seeds",
             "", f"{'**Partial** (cut off; rerun the command to finish): ' if res['partial'] else ''}"
             f"{res['records']} of {res['expected_records']} runs recorded. Student {res['student']}, {steps} steps "
             f"(batch {res['batch']}); scored at steps {evals} with {res['num_samples']} samples "
             f"({res['sampling_steps']} DDPM steps, CFG {res['cfg_scale']}) against {res['num_ref']} training images; "
             "FID on so few images is biased upward, so compare arms with each other (same noise, same seeds), "
             "not with published FIDs.", "",
             f"Command: `{res['command']}`", f"Machine: {res.get('machine', 'see runs/*.json')}; "
             f"summed run time {res['summed_run_time_s'] / 60:.0f} min"
             + (f"; this invocation {res['wall_time_this_invocation_s'] / 60:.0f} min for {res['runs_this_invocation']} runs"
                if res.get("runs_this_invocation") else ""),
             ""]
    if "teacher" in res:
        lines += [f"Teacher (the ceiling, same sampling and scoring): FID {res['teacher']['fid']:.2f}", ""]
    lines += ["## FID (mean ± std over seeds)", "",
              "| arm | what | paper | " + " | ".join(f"step {x}" for x in evals) + " | KID x 1e3 | precision | recall |",
              "|---|---|---|" + "---|" * (len(evals) + 3)]
    for arm in arms:
        t = summ["fid"][arm]
        lines.append(f"| `{arm}` | {ARMS[arm].title} | {ARMS[arm].paper} | "
                     + " | ".join(_pm(t[str(x)]) for x in evals)
                     + f" | {_pm(t['kid_mean'], 2, 1e3)} | {_pm(t['precision'], 3)} | {_pm(t['recall'], 3)} |")
    paired = summ["paired_vs_" + REFERENCE_ARM]
    lines += ["", f"## Paired differences: FID(arm) − FID({REFERENCE_ARM}), same seed", "",
              f"Positive: {REFERENCE_ARM} is better. Last column: seeds where {REFERENCE_ARM} is better at step {steps}.", "",
              "| arm | " + " | ".join(f"step {x}" for x in evals) + f" | per seed (step {steps}) | {REFERENCE_ARM} better |",
              "|---|" + "---|" * (len(evals) + 2)]
    for arm, per in paired.items():
        last = per[str(steps)]
        seeds = ", ".join(f"s{sd}: {d:+.1f}" for sd, d in last["per_seed"].items()) or "–"
        lines.append(f"| `{arm}` | " + " | ".join(_pm(per[str(x)]) for x in evals)
                     + f" | {seeds} | {last['reference_better']} of {last['n']} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    lines += ["", "## Figures", "", "![FID against steps](fid_vs_steps.png)", ""]
    if "alpha_stats" in res:
        lines += [f"Alpha per teacher head (paper Fig. 2 style; groups {res['groups']}): unconstrained eq. 6 on "
                  "reference images at t ~ U[0, 1000), one colour per teacher head, one panel per teacher layer.", "",
                  "![alpha per head](alpha_per_head.png)", ""]
    lines += ["Per-run records (config hash, per-step scores, times, machine): `runs/<arm>-s<seed>.json`.", ""]
    return "\n".join(lines)


def _notes(records: dict[tuple[str, int], dict[str, Any]], summary: dict[str, Any], steps: int, scfg: Any) -> list[str]:
    """What the tables alone would not tell: the ordering, an arm that repeats the method by
    construction, scores that say little at this sample count, the time per run."""
    from ..shd import default_groups, progressive_groups

    notes = []
    final = {a: t[str(steps)] for a, t in summary["fid"].items() if t[str(steps)]["mean"] is not None}
    if final:
        ranked = sorted(final, key=lambda a: final[a]["mean"])
        notes.append(f"Ordering at step {steps} by mean FID, best first: "
                     + ", ".join(f"`{a}` {final[a]['mean']:.1f}" for a in ranked) + ".")
    ht, hs = scfg.teacher.model.num_heads, scfg.student.num_heads
    one_level = math.ceil(ht / 2) == hs and progressive_groups(ht, hs) == (scfg.distill.groups or default_groups(ht, hs))
    if one_level and "kd_progressive" in final:
        notes.append(f"At {ht} -> {hs} heads progressive merging is a single pairwise level on adjacent pairs: the "
                     "groups and eq. 6 alphas of the least-squares squeeze (`tests/test_shd.py` checks the two agree), "
                     f"so `kd_progressive` repeats `{REFERENCE_ARM}` up to float rounding. The two differ only "
                     "where merging takes two levels or more (e.g. 16 -> 4 heads).")
    last = [e for r in records.values() for e in r["evals"] if e["step"] == steps]
    if last:
        lo, hi = min(e["precision"] for e in last), max(e["precision"] for e in last)
        notes.append(f"Precision at step {steps} lies in [{lo:.2f}, {hi:.2f}] over all runs (recall in "
                     f"[{min(e['recall'] for e in last):.2f}, {max(e['recall'] for e in last):.2f}]): with this few "
                     "samples and students this early they barely separate the arms; read FID and KID.")
    walls = sorted(r["wall_s"] for r in records.values() if "wall_s" in r)
    if walls:
        notes.append(f"Median time per run (train {steps} steps, sample and score 3 checkpoints): "
                     f"{walls[len(walls) // 2] / 60:.1f} min over {len(walls)} runs; the summed time includes runs "
                     "made while the machine was shared.")
    return notes


def write_study_report(
    report_dir: Path, records: dict[tuple[str, int], dict[str, Any]], s: DemoSettings, steps: int, scfg: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and ``fid_vs_steps.png`` from the run records so far
    (``scfg``: any arm's student config, for the model and batch it names)."""
    mc = scfg.student
    arms = tuple(ARMS)
    summary = summarise(records, arms, steps)
    res = {"format": "shd_diffusion.study/v1", "study": "ablations", "arms": list(arms), "seeds": list(s.seeds),
           "steps": steps, "batch": scfg.train.global_batch_size,
           "student": f"{mc.name} {mc.hidden_size} wide, {mc.depth} layers, {mc.num_heads} heads",
           "num_samples": s.num_samples, "num_ref": s.num_ref, "sampling_steps": s.sampling_steps, "cfg_scale": s.cfg_scale,
           "records": len(records), "expected_records": len(arms) * len(s.seeds),
           "summed_run_time_s": round(sum(r.get("wall_s", 0.0) for r in records.values()), 1),
           **extra, "notes": _notes(records, summary, steps, scfg), "summary": summary}
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "results.json", res)
    if records:
        _figure(summary, arms, steps, report_dir / "fid_vs_steps.png")
    write_text(report_dir / "report.md", _markdown(res))
    return res
