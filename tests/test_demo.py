"""The embedded demo end to end at a microscopic size (``scripts/demo.py --size tiny``).

One module-scoped run (2 training steps per run, 10 samples of 3 sampling steps, 10 reference
images, FID on those) feeds the checks; the reruns check that finished stages are reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reset_accelerate_state
from shd_diffusion import demo
from shd_diffusion.commands import demo as demo_command
from shd_diffusion.demo import teacher as demo_teacher
from shd_diffusion.models.sources import load_model

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "kd", "kd_shd")


def _cli():
    """The demo command (what scripts/demo.py and shd-demo run)."""
    return demo_command


@pytest.fixture(autouse=True, scope="module")
def _fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out, weights = tmp / "out", tmp / "inception.pth"
    argv = ["--size", "tiny", "--out", str(out), "--inception-weights", str(weights), "--no-progress"]
    assert _cli().main(argv) == 0
    return out, weights, argv


def _mtimes(out: Path) -> dict[str, int]:
    """mtime of every stage product: checkpoints, samples, scores, reference, figures, grids."""
    patterns = ["runs/*/checkpoints/*.pt", "samples/*/*.npz", "samples/*/shards/*.npz", "scores/*.json",
                "reference/*.npz", "figures/*.png", "samples_*.png", "reference_grid.png"]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for pat in patterns for p in sorted(out.glob(pat))}


@pytest.mark.slow
def test_every_output_exists_and_results_cover_every_mode(run):
    out, weights, _ = run
    for name in ["results.md", "results.json", "reference_grid.png", "figures/attention_teacher.png",
                 "figures/alpha_histograms.png", "samples_teacher.png", *(f"samples_{m}_s0.png" for m in MODES)]:
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp*")), "a temporary file was left behind"
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == demo.FORMAT and res["settings"]["size"] == "tiny"
    t = res["teacher"]["scores"]  # the teacher is sampled and scored like the students
    assert math.isfinite(t["fid"]) and 0 <= t["precision"] <= 1 and "*teacher (reference)*" in (out / "results.md").read_text()
    assert list(res["modes"]) == list(MODES)
    for mode, m in res["modes"].items():
        assert {"fid", "precision", "recall", "kid", "is", "is_unavailable_reason", "train_time_s", "seeds"} <= set(m)
        assert m["seeds"] == [0] and m["fid"]["n"] == 1
        assert math.isfinite(m["fid"]["mean"]) and m["fid"]["mean"] >= 0
        assert 0 <= m["precision"]["mean"] <= 1 and 0 <= m["recall"]["mean"] <= 1
        assert math.isfinite(m["kid"]["mean"])
        # Offline Inception has no logits: IS must be null with the reason, never a number.
        assert m["is"] is None and "logits" in m["is_unavailable_reason"]
        assert m["train_time_s"]["mean"] > 0
    for r in res["runs"]:
        assert r["is"] is None and r["num_samples"] == 10 and r["num_ref"] == 10 and r["kid_subset_size"] == 10
        assert r["steps"] == 2 and r["train_reused"] is False
        assert (out / r["checkpoint"]).is_file() and (out / r["samples"]).is_file()
    assert res["inception"]["weights_path"] == str(weights.resolve()) and len(res["inception"]["sha256"]) == 64
    assert res["inception"]["logits_available"] is False
    assert {"torch", "torch-fidelity", "python"} <= set(res["versions"])
    assert [row["setting"] for row in res["settings_vs_paper"]][:4] == ["data", "tokens", "teacher", "student"]

    md = (out / "results.md").read_text()
    assert "| mode | runs | FID ↓ | precision ↑ | recall ↑ | KID ×10³ ↓ | IS | train time |" in md
    for mode in MODES:
        assert f"| {mode} | 1 |" in md
    assert "IS unavailable" in md and "| setting | this demo | paper (ImageNet 256) |" in md


@pytest.mark.slow
def test_samples_follow_the_sampling_rules(run):
    out, _, _ = run
    res = json.loads((out / "results.json").read_text())
    for r in res["runs"]:
        with np.load(out / r["samples"]) as z:
            images, labels = z["arr_0"], z["arr_1"]
        assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.arange(10) % 10)  # balanced labels i % 10
        np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grayscale replicated
    # 10 images, one row, 32 px each with torchvision's 2 px padding.
    assert Image.open(out / "samples_kd_shd_s0.png").size == (10 * 34 + 2, 36)


@pytest.mark.slow
def test_reference_is_the_stated_class_balanced_subset(run):
    out, _, _ = run
    from shd_diffusion.data import AnimalMNIST
    from shd_diffusion.sampler import to_uint8_images

    ds = AnimalMNIST(image_size=32)
    labels = ds.labels.numpy()
    with np.load(out / "reference" / "animal_mnist_10.npz") as z:
        idx, images, ref_labels = z["indices"], z["arr_0"], z["arr_1"]
    # One image per class: position floor(0 * n_c / 1) = 0, the first image of each class.
    np.testing.assert_array_equal(idx, [np.flatnonzero(labels == c)[0] for c in range(10)])
    np.testing.assert_array_equal(ref_labels, np.arange(10))
    np.testing.assert_array_equal(images, to_uint8_images(torch.stack([ds[int(i)][0] for i in idx])))


def test_reference_indices_rule():
    labels = np.repeat(np.arange(10), 7)[::-1].copy()  # 7 per class, not sorted ascending
    idx = demo.reference_indices(labels, 25)
    counts = np.bincount(labels[idx], minlength=10)
    np.testing.assert_array_equal(counts, [3] * 5 + [2] * 5)  # remainder to the first classes
    members = np.flatnonzero(labels == 0)
    np.testing.assert_array_equal(np.intersect1d(idx, members), members[[0, 2, 4]])  # floor(i * 7 / 3)
    np.testing.assert_array_equal(demo.reference_indices(labels, 0), np.arange(70))


@pytest.mark.slow
def test_alpha_statistics_and_figures(run):
    out, _, _ = run
    res = json.loads((out / "results.json").read_text())
    a = res["alphas"]
    # Tiny teacher: 4 attention layers; student 2 layers -> teacher layers round(j * 4 / 2) = 2, 4.
    assert [s["layer"] for s in a["alpha_stats"]] == [1, 2, 3, 4]
    assert a["shd_teacher_layers"] == [2, 4]
    assert a["groups"] == [[2 * j, 2 * j + 1] for j in range(6)]
    for s in a["alpha_stats"]:
        assert s["n"] == 4 * 12 and abs(s["mean"] - 0.5) < 1e-5  # pairs: alpha and 1 - alpha
        assert 0 <= s["outside_unit_interval"] <= 1
    assert a["token_grid"] == 4 and a["query_token"] == 2 * 4 + 2
    w, h = Image.open(out / "figures" / "attention_teacher.png").size
    assert w > 19 * 48 and h > 4 * 48  # x_t + 12 heads + 6 squeezed maps per row, 4 layer rows


@pytest.mark.slow
def test_rerun_reuses_every_stage(run):
    out, _, argv = run
    before = _mtimes(out)
    assert any(k.startswith("runs/teacher-") for k in before) and len(before) >= 15
    assert _cli().main(argv) == 0
    assert _mtimes(out) == before
    res = json.loads((out / "results.json").read_text())
    assert all(stage["reused"] for stage in res["stage_times_s"].values()), res["stage_times_s"]
    assert res["teacher"]["reused"] is True


@pytest.mark.slow
def test_changed_sampling_resamples_but_keeps_training(run):
    out, _, argv = run
    ckpts = {k: v for k, v in _mtimes(out).items() if k.startswith("runs/")}
    folders = set((out / "samples").iterdir())
    assert _cli().main([*argv, "--modes", "kd_shd", "--sampling-steps", "2"]) == 0
    assert {k: v for k, v in _mtimes(out).items() if k.startswith("runs/")} == ckpts
    new = set((out / "samples").iterdir()) - folders
    # The changed sampler resamples the student and the teacher reference, nothing else.
    assert sorted(p.name.split("-")[0] for p in new) == ["kd_shd", "teacher"]
    res = json.loads((out / "results.json").read_text())
    assert list(res["modes"]) == ["kd_shd"] and res["settings"]["sampling_steps"] == 2
    assert not res["stage_times_s"]["samples kd_shd seed 0"]["reused"]
    assert res["stage_times_s"]["student kd_shd seed 0"]["reused"]


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    cli = _cli()
    assert cli.main(["--size", "tiny", "--out", str(tmp_path / "o"), "--modes", "kd,distil"]) == 2
    assert "unknown mode(s) ['distil']" in capsys.readouterr().err
    assert cli.main(["--size", "tiny", "--out", str(tmp_path / "o"), "--num-samples", "2"]) == 2
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the committed demo teacher


def test_cpu_size_starts_from_the_committed_teacher(tmp_path):
    s = demo.resolve_settings("cpu")
    assert s.train_teacher is False and demo.resolve_settings("cpu", train_teacher=True).train_teacher is True
    assert demo.SIZES["tiny"].train_teacher and demo.SIZES["gpu"].train_teacher and demo.SIZES["study"].train_teacher
    text = demo.describe(s, tmp_path)
    assert "(the committed teacher: not trained)" in text
    scfg = demo.student_config(s, "kd_shd", 0, demo.teacher_config(s, tmp_path), demo.TEACHER_ASSET, tmp_path)
    assert scfg.teacher.checkpoint == str(demo.TEACHER_ASSET)
    # --train-teacher switches back to configs/demo_teacher.yaml, trained in out/runs/teacher-<hash>.
    tcfg = demo.teacher_config(demo.resolve_settings("cpu", train_teacher=True), tmp_path)
    assert tcfg.train.run_name.startswith("teacher-") and tcfg.train.output_dir == str(tmp_path / "runs")
    assert _cli().build_parser().parse_args(["--train-teacher"]).train_teacher is True
    with pytest.raises(demo.DemoError, match="--train-teacher"):
        demo.teacher_config(demo.resolve_settings("tiny", train_teacher=False), tmp_path)  # tiny has teacher overrides


def test_committed_teacher_loads_and_matches_its_config():
    from safetensors.torch import load_file

    run = demo.committed_teacher()
    meta = json.loads((demo.TEACHER_ASSET / "teacher.json").read_text())
    weights = demo.TEACHER_ASSET / demo.TEACHER_WEIGHTS
    assert run.step == meta["step"] > 0 and run.reused and run.train_time_s == meta["train_time_s"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["weights_sha256"]
    cfg = demo.teacher_config(demo.resolve_settings("cpu"), Path("unused"))
    assert cfg.train.steps == meta["step"] and cfg.distill.mode == "none"
    model = load_model(demo.TEACHER_ASSET)
    mc = cfg.student
    assert (model.config.hidden_size, model.config.depth, model.config.num_heads, model.config.patch_size) == (
        mc.hidden_size, mc.depth, mc.num_heads, mc.patch_size)
    state = load_file(str(weights))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    assert demo.count_params(demo.TEACHER_ASSET) == meta["params"]


def test_missing_committed_teacher_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_teacher, "TEACHER_ASSET", tmp_path / "demo_teacher")
    with pytest.raises(demo.DemoError, match="--train-teacher"):
        demo.committed_teacher()


@pytest.mark.slow
def test_export_teacher_round_trip(run, tmp_path):
    out, _, _ = run
    ckpt = sorted(out.glob("runs/teacher-*/checkpoints/step_*.pt"))[-1]
    meta = demo.export_teacher(ckpt, tmp_path / "asset", train_time_s=12.34)
    assert meta["step"] == 2 and meta["train_time_s"] == 12.3
    exported, original = load_model(tmp_path / "asset"), load_model(ckpt, use_ema=True)
    ref = original.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in exported.state_dict().items())
    cfg_text = (tmp_path / "asset" / "train_config.yaml").read_text()
    assert "steps: 2" in cfg_text and "mode: none" in cfg_text


@pytest.mark.slow
def test_export_teacher_swaps_the_folder_atomically(run, tmp_path, monkeypatch):
    """The folder is written beside the target and swapped in; a failed export changes nothing."""
    out, _, _ = run
    ckpt = sorted(out.glob("runs/teacher-*/checkpoints/step_*.pt"))[-1]
    dest = tmp_path / "asset"
    demo.export_teacher(ckpt, dest, train_time_s=1.0)
    (dest / "README.md").write_text("kept\n")  # a file the export does not write
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(demo_teacher, "count_params", broken)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        demo.export_teacher(ckpt, dest, train_time_s=2.0)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # no temporary folder left behind
    monkeypatch.undo()

    meta = demo.export_teacher(ckpt, dest, train_time_s=2.0)
    assert meta["train_time_s"] == 2.0 and json.loads((dest / "teacher.json").read_text()) == meta
    assert (dest / "README.md").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


@pytest.mark.slow
def test_export_teacher_onto_a_full_disk_raises_an_os_error(run, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError; the teacher export re-raises the OSError
    (what run_main turns into one error line) and leaves the previous folder as it was."""
    import safetensors.torch
    from safetensors import SafetensorError

    out, _, _ = run
    ckpt = sorted(out.glob("runs/teacher-*/checkpoints/step_*.pt"))[-1]

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left") as err:
        demo.export_teacher(ckpt, tmp_path / "asset", train_time_s=1.0)
    assert err.value.errno == 28 and not isinstance(err.value, SafetensorError)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder


@pytest.mark.slow
def test_demo_runs_from_the_committed_teacher(run, tmp_path):
    """The default path: no teacher training; tiny students at the committed teacher's 64 tokens."""
    _, weights, _ = run
    tiny = demo.SIZES["tiny"]
    overrides = tuple(o for o in tiny.student_overrides if not o.startswith("student.patch_size"))
    s = demo.resolve_settings("tiny", train_teacher=False, teacher_overrides=(), student_overrides=overrides,
                              modes=("kd_shd",))
    reset_accelerate_state()
    res = demo.run_demo(s, tmp_path / "out", weights, "cpu", progress=False)
    assert res["teacher"]["committed"] is True and res["teacher"]["reused"] is True
    assert res["teacher"]["steps"] == demo.committed_teacher().step
    assert not list((tmp_path / "out" / "runs").glob("teacher-*"))  # nothing trained for the teacher
    assert res["runs"][0]["steps"] == 2 and math.isfinite(res["teacher"]["scores"]["fid"])
    assert "the committed teacher: not trained by this demo" in (tmp_path / "out" / "results.md").read_text()


# ------------------------------------------------------------------ refusals before any work


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every stage that does work (training, the committed teacher, references, Inception
    conversion, loading a model to export) fail the test if it is reached."""
    from shd_diffusion.demo import pipeline
    from shd_diffusion.models import sources

    def reached(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    for name in ("ensure_trained", "committed_teacher", "ensure_reference", "ensure_inception_weights"):
        monkeypatch.setattr(pipeline, name, reached)
    monkeypatch.setattr(sources, "load_model", reached)


def _inception_file(tmp: Path, kind: str) -> str:
    path = tmp / "in" / f"inception_{kind}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "bytes":
        path.write_bytes(b"\x00not a torch file" * 8)
    elif kind == "foreign":  # a readable weights-only state dict that is not torch-fidelity's network
        torch.save({"fc.weight": torch.zeros(3, 2), "conv.weight": torch.ones(1)}, path)
    return str(path)


def _teacher_file(tmp: Path, where: str) -> str:
    """A file for --export-teacher that training did not write where the export expects it."""
    path = tmp / "in" / where
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1}, path)
    return str(path)


GOOD = ["--size", "tiny", "--no-progress", "--device", "cpu"]
DEMO_CASES = [
    ("cfg-nan", ["--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    ("cfg-inf", ["--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    ("cfg-below-one", ["--cfg-scale", "0.5"], ["--cfg-scale", ">= 1"]),
    ("sampling-steps-zero", ["--sampling-steps", "0"], ["--sampling-steps", ">= 1"]),
    ("sampling-steps-above-1000", ["--sampling-steps", "1001"], ["--sampling-steps 1001", "1000"]),
    ("num-samples-negative", ["--num-samples", "-5"], ["--num-samples", ">= 1"]),
    ("num-samples-three", ["--num-samples", "3"], [">= 4 samples"]),
    ("num-ref-negative", ["--num-ref", "-1"], ["reference images", "-1"]),
    ("num-ref-two", ["--num-ref", "2"], [">= 4 reference images"]),
    ("seed-negative", ["--seeds", "0,-1"], ["--seeds", "-1"]),
    ("seed-too-large", ["--seeds", str(2**63)], ["--seeds", "2^63"]),
    ("seed-repeated", ["--seeds", "1,1"], ["without repeats"]),
    ("device-bogus", ["--device", "gpu0"], ["--device", "gpu0"]),
    ("inception-unreadable", ["--inception-weights", "{bytes}"], ["inception_bytes.pth", "not a readable"]),
    ("inception-foreign", ["--inception-weights", "{foreign}"], ["inception_foreign.pth", "do not fit"]),
    ("inception-under-a-file", ["--inception-weights", "{bytes}/x.pth"], ["--inception-weights", "is a file"]),
    ("out-is-a-file", ["--out", "{bytes}"], ["--out", "is a file"]),
    ("config-dir-missing", ["--config-dir", "{tmp}/nope"], ["nope", "not found"]),
    ("teacher-only-bad-inception", ["--teacher-only", "--inception-weights", "{bytes}"], ["inception_bytes.pth"]),
    ("train-time-without-export", ["--train-time", "5"], ["--train-time", "--export-teacher"]),
    ("export-teacher-missing", ["--export-teacher", "{tmp}/nope.pt"], ["nope.pt", "no such file"]),
    ("export-teacher-bare-file", ["--export-teacher", "{flat}"], ["flat.pt", "RUN/checkpoints/step_"]),
    ("export-teacher-misnamed", ["--export-teacher", "{misnamed}"], ["last.pt", "RUN/checkpoints/step_"]),
    ("export-teacher-no-config", ["--export-teacher", "{noconfig}"], ["RUN/config.yaml", "has none"]),
    ("export-teacher-train-time-nan", ["--export-teacher", "{noconfig}", "--train-time", "nan"], ["--train-time", "finite"]),
]
if not torch.cuda.is_available():
    DEMO_CASES.append(("device-cuda-without-gpu", ["--device", "cuda"], ["--device cuda", "not available"]))


@pytest.mark.parametrize("extra, needles", [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES])
def test_demo_refuses_bad_input_before_any_work(tmp_path, monkeypatch, extra, needles):
    """Every flag is checked up front: one ``error:`` line, exit 2, no stage started, nothing written
    (before, bad Inception weights were found only after every student was trained and sampled)."""
    from cli_cases import call, snapshot

    _no_work(monkeypatch)
    names = {"tmp": str(tmp_path), "bytes": _inception_file(tmp_path, "bytes"),
             "foreign": _inception_file(tmp_path, "foreign"), "flat": _teacher_file(tmp_path, "flat.pt"),
             "misnamed": _teacher_file(tmp_path, "run/checkpoints/last.pt"),
             "noconfig": _teacher_file(tmp_path, "bare/checkpoints/step_00000002.pt")}
    argv = [*GOOD, "--out", str(tmp_path / "o"), "--inception-weights", str(tmp_path / "w" / "inc.pth"),
            *(e.format(**names) for e in extra)]
    before = snapshot(tmp_path)
    outcome = call(_cli().main, argv)
    assert outcome.code == 2, outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in outcome.stderr, outcome.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_demo_preflight_accepts_the_valid_command(tmp_path, monkeypatch):
    # The control of the table: the same base command passes every check and reaches the first stage.
    _no_work(monkeypatch)
    with pytest.raises(AssertionError, match="work started"):
        _cli().main([*GOOD, "--out", str(tmp_path / "o"), "--inception-weights", str(tmp_path / "w" / "inc.pth")])


def test_unfinished_samples_never_resume_from_other_weights(tmp_path):
    """A demo sample folder is named by the checkpoint's path; its manifest also holds the weights'
    hash, so weights replaced at that path before the folder was finished are refused."""
    from shd_diffusion.models import create_model
    from shd_diffusion.shards import ShardError, shard_path

    arch = dict(input_size=8, hidden_size=16, depth=2, num_heads=2, num_classes=10, in_channels=1)
    s = demo.resolve_settings("tiny", num_samples=4, num_ref=4, sampling_steps=2, shard_size=2, sample_batch_size=2)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    torch.manual_seed(0)
    create_model("DiT-S/2", **arch).save_pretrained(ckpt)
    samples, reused = demo.ensure_samples(ckpt, "run", s, out, torch.device("cpu"), progress=False)
    assert not reused
    samples.unlink()
    shard_path(samples.parent, 1).unlink()  # as if killed before the second shard
    torch.manual_seed(1)
    create_model("DiT-S/2", **arch).save_pretrained(ckpt)  # other weights, same path
    with pytest.raises(ShardError, match="weights_sha256.*mix two models"):
        demo.ensure_samples(ckpt, "run", s, out, torch.device("cpu"), progress=False)
    assert not shard_path(samples.parent, 1).exists()
