"""benchmarks/study_estimate.py at the demo's tiny size, and benchmarks/gpu_study.sh --smoke end to end.

The estimate's stage times are recomputed here from its own reported counts and assumptions and
from the demo's settings (an independent oracle for its arithmetic); bad input must be refused
with one ``error:`` line before any counting.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_cases import assert_refused, call

from conftest import reset_accelerate_state
from shd_diffusion import demo

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "kd", "kd_shd")
# Toy rates, chosen so that at tiny size some stages are compute-bound (teacher training, sampling)
# and some launch-bound (student training): the oracle then checks both terms of its max().
ASSUMED = {"tflops": 1e-4, "launch_us": 50.0, "inception_tflops": 0.5, "setup_s": 7.0}


def _estimate_module():
    spec = importlib.util.spec_from_file_location("study_estimate", REPO / "benchmarks" / "study_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reset_accelerate_state()
    path = tmp_path_factory.mktemp("estimate") / "sub" / "estimate.json"
    argv = ["--size", "tiny", "--batch", "2", "--json", str(path)]
    for key, value in ASSUMED.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = call(_estimate_module().main, argv)
    reset_accelerate_state()
    assert out.code == 0, out.stderr
    return json.loads(path.read_text()), out.stdout


def _seconds(flops: float, launches: int, bound: list[str]) -> float:
    """The oracle's stage time: the larger of compute at the assumed rate and the launch overhead
    (which of the two won is appended to ``bound``)."""
    compute, launch = flops / (ASSUMED["tflops"] * 1e12), launches * ASSUMED["launch_us"] * 1e-6
    bound.append("compute" if compute > launch else "launch")
    return max(compute, launch)


def test_the_stage_list_covers_the_study(report):
    rep, _ = report
    s = demo.resolve_settings("tiny")
    runs = len(s.modes) * len(s.seeds)
    assert rep["size"] == "tiny" and rep["assumptions"] == ASSUMED
    assert [r["stage"] for r in rep["stages"]] == [
        "set-up", "teacher", *(f"students {m} ({len(s.seeds)} seeds)" for m in MODES),
        f"sampling student ({runs} runs)", "sampling teacher (1 run)", "scoring"]
    assert f"{(runs + 1) * s.num_samples + s.num_ref} Inception forwards" in rep["stages"][-1]["work"]


def test_measured_counts_are_positive_and_grow_with_the_distillation_terms(report):
    c = report[0]["counts"]
    for name in ("teacher", *MODES):
        assert c[name]["flops_per_image"] > 0 and c[name]["launches_per_step"] > 0 and c[name]["cpu_s_per_step"] > 0
        assert c[name]["cpu_batch"] == 2
    # kd adds a teacher forward to the student step, kd_shd the squeeze and SHD loss on top.
    assert c["none"]["flops_per_image"] < c["kd"]["flops_per_image"] < c["kd_shd"]["flops_per_image"]
    assert c["none"]["launches_per_step"] < c["kd"]["launches_per_step"] < c["kd_shd"]["launches_per_step"]
    # One 299 x 299 Inception-v3 forward: about 5.7 G multiply-adds, counted as 2 FLOPs each.
    assert 10e9 < c["inception_flops_per_image"] < 13e9


def test_projected_seconds_follow_the_counts(report, tmp_path):
    rep, stdout = report
    c, stages = rep["counts"], {r["stage"]: r["expected_s"] for r in rep["stages"]}
    s = demo.resolve_settings("tiny")
    tcfg = demo.teacher_config(s, tmp_path)
    runs, seeds = len(s.modes) * len(s.seeds), len(s.seeds)
    bound: list[str] = []
    want = {"set-up": ASSUMED["setup_s"],
            "teacher": tcfg.train.steps * _seconds(c["teacher"]["flops_per_image"] * tcfg.train.global_batch_size,
                                                   c["teacher"]["launches_per_step"], bound)}
    scfg = demo.student_config(s, "none", 0, tcfg, tmp_path / "teacher.pt", tmp_path)
    for mode in MODES:
        want[f"students {mode} ({seeds} seeds)"] = seeds * scfg.train.steps * _seconds(
            c[mode]["flops_per_image"] * scfg.train.global_batch_size, c[mode]["launches_per_step"], bound)
    per_batch = min(s.sample_batch_size, s.shard_size)
    batches = math.ceil(s.num_samples / per_batch)
    for name, n_runs in (("student", runs), ("teacher", 1)):
        k = c[f"sample_{name}"]
        label = f"sampling {name} ({n_runs} run{'s' if n_runs > 1 else ''})"
        want[label] = n_runs * batches * s.sampling_steps * _seconds(
            k["flops_per_image_step"] * per_batch, k["launches_per_step"], bound)
    images = (runs + 1) * s.num_samples + s.num_ref
    want["scoring"] = images * c["inception_flops_per_image"] / (ASSUMED["inception_tflops"] * 1e12)
    assert set(bound) == {"compute", "launch"}, bound  # both branches of max() were exercised
    assert stages == pytest.approx(want, rel=1e-9)
    assert rep["total_s"] == pytest.approx(sum(want.values()), rel=1e-9)
    assert f"| total | | {rep['total_s']:.0f} |" in stdout


@pytest.mark.parametrize("argv, needle", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--tflops", "0"], "--tflops must be > 0"),
    (["--inception-tflops", "nan"], "--inception-tflops must be > 0"),
    (["--launch-us", "-1"], "--launch-us must be >= 0"),
    (["--setup-s", "-5"], "--setup-s must be >= 0"),
])
def test_bad_numbers_are_refused_before_any_counting(argv, needle):
    assert_refused(call(_estimate_module().main, ["--size", "tiny", *argv]), needle)


def test_a_json_path_that_is_a_folder_is_refused(tmp_path):
    assert_refused(call(_estimate_module().main, ["--size", "tiny", "--json", str(tmp_path)]), "is a folder")


def test_an_unknown_size_is_refused(tmp_path):
    assert_refused(call(_estimate_module().main, ["--size", "huge"]), "invalid choice", "huge")


@pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils timeout")
@pytest.mark.slow
def test_gpu_study_smoke_runs_every_mode_with_two_seeds(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "STUDY_WORK": str(work), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_study.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # What the study copies back: the report, the teacher's and the seed-0 students' grids, the log.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.md", "results.json", "study.log", "samples_teacher.png", *(f"samples_{m}_s0.png" for m in MODES)])
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["size"] == "tiny" and res["settings"]["seeds"] == [0, 1]
    assert list(res["modes"]) == list(MODES)
    for mode, m in res["modes"].items():
        assert m["seeds"] == [0, 1] and m["fid"]["n"] == 2 and math.isfinite(m["fid"]["mean"]), (mode, m)
    runs = {(r["mode"], r["seed"]) for r in res["runs"]}
    assert runs == {(m, seed) for m in MODES for seed in (0, 1)}
    assert all(r["num_ref"] == 10 and r["num_samples"] == 10 for r in res["runs"])  # the tiny preset
    assert math.isfinite(res["teacher"]["scores"]["fid"])
    log = (out / "study.log").read_text()
    assert "[gpu_study] demo exit status 0" in log and "device cpu" in log
    for mode in MODES:
        assert f"| {mode} | 2 |" in (out / "results.md").read_text()
