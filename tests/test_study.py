"""The ablation study (``scripts/demo.py --study ablations``): its statistics, its end-to-end run at
the tiny size (every arm, a report with every section) and its resume from the run records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import reset_accelerate_state
from shd_diffusion.demo import study
from shd_diffusion.commands.demo import main as demo_main  # what scripts/demo.py runs


def _record(arm: str, seed: int, fids: list[float]) -> dict:
    evals = [{"step": st, "fid": f, "kid_mean": f / 1000, "kid_std": 0.0, "precision": 0.5, "recall": 0.25}
             for st, f in zip((1, 2, 4), fids)]
    return {"arm": arm, "seed": seed, "evals": evals, "wall_s": 1.0}


def test_summary_means_stds_and_paired_differences_by_hand():
    records = {("kd_shd", 0): _record("kd_shd", 0, [30, 20, 10]), ("kd_shd", 1): _record("kd_shd", 1, [32, 22, 14]),
               ("kd", 0): _record("kd", 0, [31, 25, 13]), ("kd", 1): _record("kd", 1, [30, 24, 12]),
               ("kd", 2): _record("kd", 2, [40, 40, 40])}  # seed 2 has no kd_shd partner: not paired
    s = study.summarise(records, ("kd", "kd_shd"), steps=4)
    fid = s["fid"]["kd_shd"]["4"]
    assert fid["mean"] == 12.0 and fid["n"] == 2 and fid["std"] == pytest.approx(8 ** 0.5, abs=1e-12)
    assert s["fid"]["kd"]["4"]["n"] == 3 and s["fid"]["kd"]["4"]["mean"] == pytest.approx(65 / 3)
    paired = s["paired_vs_kd_shd"]["kd"]["4"]
    assert paired["per_seed"] == {"0": 3.0, "1": -2.0} and paired["n"] == 2
    assert paired["mean"] == 0.5 and paired["std"] == pytest.approx(12.5 ** 0.5) and paired["reference_better"] == 1
    assert s["paired_vs_kd_shd"]["kd"]["1"]["per_seed"] == {"0": 1.0, "1": -2.0}
    assert "kd_shd" not in s["paired_vs_kd_shd"]
    assert s["fid"]["kd"]["kid_mean"]["mean"] == pytest.approx(65 / 3000)


def test_every_arm_builds_its_config_and_changes_what_it_says(tmp_path):
    from shd_diffusion.demo import resolve_settings, teacher_config

    s = resolve_settings("cpu", seeds=(0,))
    tcfg = teacher_config(s, tmp_path)
    configs = study.study_configs(s, tuple(study.ARMS), 400, tcfg, Path("teacher"), tmp_path)
    base = configs["kd_shd", 0].distill
    assert (base.mode, base.squeeze, base.loss, base.shd_beta, base.temperature) == ("kd_shd", "lstsq", "kl", 0.25, 2.0)
    expect = {"none": ("mode", "none"), "kd": ("mode", "kd"), "kd_constant": ("squeeze", "constant"),
              "kd_hard": ("squeeze", "hard"), "kd_matching": ("squeeze", "matching"),
              "kd_progressive": ("squeeze", "progressive"), "kd_feat": ("mode", "kd_feat"),
              "kd_selfcorr": ("mode", "kd_selfcorr"), "kd_shd_mse": ("loss", "mse"), "kd_shd_t1": ("temperature", 1.0),
              "kd_shd_beta0.1": ("shd_beta", 0.1), "kd_shd_beta1": ("shd_beta", 1.0), "kd_shd_beta2": ("shd_beta", 2.0)}
    assert set(expect) | {"kd_shd"} == set(study.ARMS)
    for arm, (field, value) in expect.items():
        cfg = configs[arm, 0]
        assert getattr(cfg.distill, field) == value, arm
        assert (cfg.train.steps, cfg.train.checkpoint_every, cfg.train.keep_last) == (400, 100, 4)
    names = {c.train.run_name for c in configs.values()}
    assert len(names) == len(study.ARMS)  # every arm trains its own run


@pytest.mark.parametrize("argv, needle", [
    (["--arms", "kd"], "--arms and --report belong to --study"),
    (["--study", "ablations", "--arms", "kd,bogus"], "unknown ablation arm(s) ['bogus']"),
    (["--study", "ablations", "--arms", "kd,none"], "keep it in --arms"),
    (["--study", "ablations", "--modes", "kd"], "use --arms instead of --modes"),
])
def test_bad_study_arguments_fail_with_one_line(tmp_path, capsys, argv, needle):
    code = demo_main([*argv, "--size", "tiny", "--out", str(tmp_path / "o"),
                        "--inception-weights", str(tmp_path / "w.pth"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    reset_accelerate_state()
    tmp = tmp_path_factory.mktemp("study")
    argv = ["--study", "ablations", "--size", "tiny", "--num-samples", "4", "--num-ref", "4", "--out", str(tmp / "out"),
            "--report", str(tmp / "report"), "--inception-weights", str(tmp / "inception.pth"), "--no-progress"]
    assert demo_main(argv) == 0
    yield tmp, argv
    reset_accelerate_state()


@pytest.mark.slow
def test_tiny_study_runs_every_arm_and_writes_every_section(tiny_study):
    tmp, _ = tiny_study
    report = tmp / "report"
    res = json.loads((report / "results.json").read_text())
    assert res["records"] == res["expected_records"] == len(study.ARMS) and res["partial"] is False
    for arm in study.ARMS:
        rec = json.loads((report / "runs" / f"{arm}-s0.json").read_text())
        assert [e["step"] for e in rec["evals"]] == [1, 2, 4] and rec["steps"] == 4
        assert all(e["fid"] > 0 for e in rec["evals"])
        assert res["summary"]["fid"][arm]["4"]["mean"] == rec["evals"][-1]["fid"]
    text = (report / "report.md").read_text()
    for section in ("## FID (mean ± std over seeds)", "## Paired differences", "## Notes", "Ordering at step 4",
                    "Median time per run", "## Figures", "fid_vs_steps.png",
                    "alpha_per_head.png", "Command: `python scripts/demo.py --study ablations", "Machine:", "Teacher"):
        assert section in text, section
    for arm in study.ARMS:
        assert f"| `{arm}` |" in text, arm
    for png in ("fid_vs_steps.png", "alpha_per_head.png"):
        assert (report / png).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_redoes_only_missing_records_even_without_the_work_folder(tiny_study):
    tmp, argv = tiny_study
    runs = tmp / "report" / "runs"
    kept = runs / "kd_shd-s0.json"
    before = kept.read_text(), kept.stat().st_mtime_ns
    redo = json.loads((runs / "kd-s0.json").read_text())
    (runs / "kd-s0.json").unlink()
    shutil.rmtree(tmp / "out" / "runs")  # "another machine": only the report folder came along...
    reset_accelerate_state()
    assert demo_main([*argv, "--arms", "kd,kd_shd"]) == 0
    students = sorted(p.name.split("-")[0] for p in (tmp / "out" / "runs").iterdir() if not p.name.startswith("teacher"))
    assert students == ["kd"]  # ...so only the missing run is trained again (the tiny size retrains its teacher)
    assert (kept.read_text(), kept.stat().st_mtime_ns) == before
    again = json.loads((runs / "kd-s0.json").read_text())
    assert again["key"] == redo["key"] and len(again["evals"]) == 3
    report = tmp / "report" / "results.json"
    made_by = json.loads(report.read_text())["command"]
    assert made_by.endswith("--arms kd,kd_shd")  # this invocation trained a run: it is quoted
    reset_accelerate_state()
    assert demo_main([*argv, "--arms", "kd_shd"]) == 0  # nothing left to do: only the report is rewritten...
    assert json.loads(report.read_text())["command"] == made_by  # ...and it keeps quoting the command that ran


def test_study_settings_are_the_study_defaults_then_the_flags():
    s = study.study_settings("cpu")
    assert s.seeds == study.STUDY_SEEDS["cpu"] and s.num_samples == study.STUDY_SETTINGS["cpu"]["num_samples"]
    s = study.study_settings("cpu", seeds=(5,), num_samples=None)  # None: a flag left out
    assert s.seeds == (5,) and s.num_samples == study.STUDY_SETTINGS["cpu"]["num_samples"]


def test_a_record_survives_a_schema_field_added_but_not_a_changed_field(tmp_path):
    """A run's name hashes its whole config, so adding a config field renames every run; the study
    must still reuse a record when its saved config matches field by field (the new one at its default)."""
    from shd_diffusion.config import to_dict
    from shd_diffusion.demo import resolve_settings, teacher_config
    from shd_diffusion.demo.runs import run_identity
    from shd_diffusion.train_config import ExperimentConfig

    s = resolve_settings("cpu", seeds=(0,))
    cfg = study.study_configs(s, ("kd_shd",), 400, teacher_config(s, tmp_path), tmp_path / "t.pt", tmp_path)["kd_shd", 0]
    config = run_identity(cfg, tmp_path)
    key = {"run": cfg.train.run_name, "num_samples": 100}
    path = tmp_path / "kd_shd-s0.json"

    def load(record):
        path.write_text(json.dumps(record))
        return study._load_record(path, key, config)

    older = json.loads(json.dumps(config))
    del older["distill"]["shd_beta"]  # as if shd_beta had been added to the schema after this record...
    renamed = {"run": "kd_shd-s0-0123abcd", "num_samples": 100}
    assert load({"key": key}) is not None  # the same key: no config needed
    assert load({"key": renamed}) is None  # renamed and no config to compare: redone
    assert load({"key": renamed, "config": config}) is not None
    assert load({"key": renamed, "config": older}) is None  # ...while the study sets it to 0.25, not its default
    defaults = to_dict(ExperimentConfig())["distill"]
    at_default = [n for n, v in config["distill"].items() if n in defaults and defaults[n] == v]
    assert at_default  # e.g. the squeeze rule, lstsq
    older = json.loads(json.dumps(config))
    for name in at_default:  # fields the student config leaves at their defaults, as if added since
        del older["distill"][name]
    assert load({"key": renamed, "config": older}) is not None
    changed = json.loads(json.dumps(config))
    changed["distill"]["temperature"] = 1.0
    assert load({"key": renamed, "config": changed}) is None
    assert load({"key": {**renamed, "num_samples": 50}, "config": config}) is None  # other settings differ
    path.write_text("{not json")
    assert study._load_record(path, key, config) is None
