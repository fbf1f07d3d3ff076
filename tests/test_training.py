"""Teacher-student training loop (shd_diffusion.training) on tiny models and the demo data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import reset_accelerate_state
from shd_diffusion.config import load_config
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import (
    NonFiniteLossError,
    Trainer,
    build_model,
    make_accelerator,
    sample_generators,
    train,
)

REPO = Path(__file__).resolve().parents[1]

# Tiny pixel-space models on the embedded animal-mnist data (1 x 32 x 32, 10 classes).
DIT_STUDENT = ["student.name=DiT-S/4", "student.hidden_size=32", "student.depth=2", "student.num_heads=2"]
DIT_TEACHER = ["teacher.model.name=DiT-S/4", "teacher.model.hidden_size=48", "teacher.model.depth=4",
               "teacher.model.num_heads=4"]
MDT_STUDENT = ["student.name=MDTv2-S/2", "student.patch_size=4", "student.hidden_size=32", "student.depth=4",
               "student.num_heads=2", "student.decode_layer=2"]
MDT_TEACHER = ["teacher.model.name=MDTv2-S/2", "teacher.model.patch_size=4", "teacher.model.hidden_size=48",
               "teacher.model.depth=6", "teacher.model.num_heads=4", "teacher.model.decode_layer=2"]
COMMON = ["data.kind=animal_mnist", "data.image_size=32", "data.num_workers=0", "train.precision=fp32",
          "train.global_batch_size=4", "train.log_every=1", "train.checkpoint_every=1000",
          "optim.lr=1e-3", "train.ema_decay=0.9"]


def _shared(prefix: str) -> list[str]:
    return [f"{prefix}.in_channels=1", f"{prefix}.num_classes=10"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def make_cfg(tmp_path: Path, mode: str, family: str = "dit", extra: list[str] = ()) -> ExperimentConfig:
    """A tiny config; writes a random teacher checkpoint when the mode needs one."""
    student, teacher = (DIT_STUDENT, DIT_TEACHER) if family == "dit" else (MDT_STUDENT, MDT_TEACHER)
    overrides = [*COMMON, *student, *_shared("student"), *teacher, *_shared("teacher.model"),
                 f"distill.mode={mode}", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=t", *extra]
    cfg = load_config(ExperimentConfig, None, overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if mode != "none" and cfg.teacher.checkpoint is None:
        ckpt = tmp_path / f"teacher_{family}.pt"
        if not ckpt.exists():
            # Random weights everywhere: a zero-initialised final layer (adaLN-Zero) would make the
            # teacher's output, and so the KD term, identically zero.
            gen = torch.Generator().manual_seed(123)
            teacher = build_model(cfg.teacher.model)
            with torch.no_grad():
                for p in teacher.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            torch.save(teacher.state_dict(), ckpt)
        cfg.teacher.checkpoint = str(ckpt)
    return cfg


def make_trainer(cfg: ExperimentConfig, tmp_path: Path) -> Trainer:
    run_dir = tmp_path / "runs" / "t"
    return Trainer(cfg, run_dir, make_accelerator(cfg, run_dir, log=False))


def fixed_batch(trainer: Trainer, n: int = 4):
    x, y = next(trainer._batches())
    gens = lambda: sample_generators(0, list(range(n)), trainer.device)  # noqa: E731
    return x[:n], y[:n], gens


EXPECTED_TERMS = {
    "none": {"diffusion"},
    "kd": {"diffusion", "kd"},
    "kd_shd": {"diffusion", "kd", "shd"},
    "shd": {"diffusion", "shd"},
    "kd_feat": {"diffusion", "kd", "feature"},
    "kd_selfcorr": {"diffusion", "kd", "feature"},
}


@pytest.mark.parametrize(
    "mode, family, extra",
    [
        ("none", "dit", []),
        ("kd", "dit", []),
        ("kd_shd", "dit", []),
        ("shd", "dit", []),
        ("kd_feat", "dit", []),
        ("kd_selfcorr", "dit", []),
        ("kd_shd", "dit", ["distill.squeeze=constant"]),
        ("kd_shd", "dit", ["distill.squeeze=hard"]),
        ("kd_shd", "dit", ["distill.squeeze=matching"]),
        ("kd_shd", "dit", ["distill.squeeze=progressive"]),
        ("kd_shd", "mdt", ["distill.temperature=2.0"]),
    ],
)
def test_every_mode_lowers_its_loss_on_a_fixed_batch(tmp_path, mode, family, extra):
    cfg = make_cfg(tmp_path, mode, family, extra)
    trainer = make_trainer(cfg, tmp_path)
    x0, y, gens = fixed_batch(trainer)
    if cfg.distill.squeeze == "matching":
        trainer._match_heads()
        assert all(sorted(i for g in layer for i in g) == list(range(4)) for layer in trainer.groups)

    def terms() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        st = trainer.compute_terms(x0, y, gens(), 0.5)
        return st.total.mean(), {k: v.mean() for k, v in st.terms.items()}

    with torch.no_grad():
        before, parts_before = terms()
    expected = EXPECTED_TERMS[mode] | ({"diffusion_masked"} if family == "mdt" else set())
    assert set(parts_before) == expected
    trained = trainer.acc.unwrap_model(trainer.trained)
    # Each distillation term on its own sends gradient into the student (and the projectors, for
    # kd_feat), never into the teacher: a detached or mis-wired term fails here.
    _, parts = terms()
    for name in expected & {"kd", "shd", "feature"}:
        assert float(parts[name].detach()) > 0, name
        trainer.optimizer.zero_grad(set_to_none=True)
        parts[name].backward(retain_graph=True)
        assert sum(float(p.grad.abs().sum()) for p in trained.student.parameters() if p.grad is not None) > 0, name
        if name == "feature" and trained.projectors is not None:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.projectors.parameters())
        assert all(p.grad is None for p in trainer.teacher.parameters()), name
    trainer.optimizer.zero_grad(set_to_none=True)
    del parts
    for _ in range(25):
        value, _ = terms()
        trainer.acc.backward(value)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after, _ = terms()
    assert torch.isfinite(after)
    assert after < 0.9 * before, (float(before), float(after))


def test_shd_and_kd_vanish_when_student_is_the_teacher(tmp_path):
    # Same architecture (H_s == H_t: identity squeeze) and the student starts from the teacher's
    # weights: every map and output agrees, so KD and SHD must be exactly zero (up to rounding).
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["distill.temperature=2.0"])
    for k in ("hidden_size", "depth", "num_heads"):
        setattr(cfg.student, k, getattr(cfg.teacher.model, k))
    trainer = make_trainer(cfg, tmp_path)
    student = trainer.acc.unwrap_model(trainer.trained).student
    student.load_state_dict(trainer.teacher.state_dict())
    student.eval()  # the teacher runs in eval mode; dropout-free models make this a no-op check
    x0, y, gens = fixed_batch(trainer)
    with torch.no_grad():
        st = trainer.compute_terms(x0, y, gens(), 0.5)
    assert float(st.terms["kd"].abs().max()) < 1e-10
    assert float(st.terms["shd"].abs().max()) < 1e-6
    assert all(torch.allclose(a, torch.ones_like(a)) for a in st.alphas)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    trained = trainer.acc.unwrap_model(trainer.trained)
    out = {f"model.{k}": v.clone() for k, v in trained.student.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    for i, st in trainer.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"opt.{i}.{k}"] = v.clone()
    return out


@pytest.mark.parametrize("family", ["dit", "mdt"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, family):
    extra = ["train.steps=4", "optim.warmup_steps=2"]
    straight_cfg = make_cfg(tmp_path / "a", "kd_shd", family, extra)
    straight = train(straight_cfg, tmp_path / "a" / "runs" / "t", resume="none", progress=False,
                     accelerator=make_accelerator(straight_cfg, tmp_path, log=False))
    assert straight.step == 4

    cfg = make_cfg(tmp_path / "b", "kd_shd", family, extra)
    run_dir = tmp_path / "b" / "runs" / "t"
    first = train(cfg, run_dir, resume="auto", max_steps=2, progress=False,
                  accelerator=make_accelerator(cfg, run_dir, log=False))
    assert first.step == 2 and (run_dir / "checkpoints" / "step_00000002.pt").exists()
    del first
    resumed = train(cfg, run_dir, resume="auto", progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    assert resumed.step == 4
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_changed_shape_field(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["train.steps=1"])
    run_dir = tmp_path / "runs" / "t"
    train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    changed = make_cfg(tmp_path, "none", "dit", ["train.steps=2", "student.hidden_size=64"])
    reset_accelerate_state()
    saved_config = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match="student.hidden_size"):
        train(changed, run_dir, progress=False, accelerator=make_accelerator(changed, run_dir, log=False))
    assert (run_dir / "config.yaml").read_text() == saved_config  # a refused resume writes nothing

    reset_accelerate_state()
    teacher_changed = make_cfg(tmp_path, "none", "dit", ["train.steps=2", "teacher.model.num_heads=2"])
    with pytest.raises(ValueError, match="teacher.model.num_heads"):
        train(teacher_changed, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))

    reset_accelerate_state()
    with pytest.raises(ValueError, match="--resume none.*step_00000001.pt"):
        train(cfg, run_dir, resume="none", progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))


def test_preemption_signal_saves_and_stops(tmp_path):
    cfg = make_cfg(tmp_path, "kd", "dit", ["train.steps=10"])
    trainer = make_trainer(cfg, tmp_path)
    original = trainer.compute_terms

    def compute_and_signal(*args, **kwargs):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    trainer.compute_terms = compute_and_signal
    trainer.fit(progress=False)
    assert trainer.step == 3
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("*.pt")) == ["step_00000003.pt"]


def test_non_finite_loss_stops_and_names_the_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["train.steps=3", "train.checkpoint_every=1"])
    trainer = make_trainer(cfg, tmp_path)
    original = trainer.compute_terms

    def poisoned(*args, **kwargs):
        st = original(*args, **kwargs)
        if trainer.step == 2:
            st.total = st.total * float("nan")
        return st

    trainer.compute_terms = poisoned
    # step_2's weights give the non-finite loss, so the last healthy checkpoint is step_1.
    with pytest.raises(NonFiniteLossError, match=r"step 2.*healthy checkpoint: \S*step_00000001\.pt.*"
                                                 r"not healthy: step_00000002\.pt.*--resume step=1"):
        trainer.fit(progress=False)
    assert (trainer.run_dir / "checkpoints" / "step_00000002.pt").exists()  # kept, not deleted


def test_clear_errors_for_bad_teacher_setups(tmp_path):
    cfg = make_cfg(tmp_path, "kd", "dit")
    cfg.teacher.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        make_trainer(cfg, tmp_path)

    cfg = make_cfg(tmp_path, "kd", "dit")
    cfg.teacher.model.hidden_size = 64  # checkpoint has 48
    with pytest.raises(ValueError, match="hidden"):
        make_trainer(cfg, tmp_path)

    grid = make_cfg(tmp_path, "kd_shd", "dit", ["teacher.model.name=DiT-S/2", "teacher.checkpoint=null"])
    grid.teacher.checkpoint = None
    torch.save(build_model(grid.teacher.model).state_dict(), tmp_path / "t2.pt")
    grid.teacher.checkpoint = str(tmp_path / "t2.pt")
    with pytest.raises(ValueError, match="token grid"):
        make_trainer(grid, tmp_path)

    heads = make_cfg(tmp_path, "kd_shd", "dit", ["student.num_heads=8", "student.hidden_size=64"])
    with pytest.raises(ValueError, match="8 heads"):
        make_trainer(heads, tmp_path)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_mdt_shd.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


@pytest.mark.slow
def test_script_dry_run_and_config_errors(tmp_path):
    ok = run_script("--config", str(REPO / "configs" / "mdtv2_s2_from_xl2.yaml"), "--dry-run", "distill.shd_beta=0.25")
    assert ok.returncode == 0, ok.stderr
    assert "shd_beta: 0.25" in ok.stdout and "name: MDTv2-XL/2" in ok.stdout
    assert "# run folder: runs/mdtv2_s2_from_xl2-" in ok.stdout

    bad = run_script("--config", str(REPO / "configs" / "demo_teacher.yaml"), "--dry-run", "train.stepz=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line, no traceback
    assert "unknown config key train.stepz" in bad.stderr

    typed = run_script("--config", str(REPO / "configs" / "demo_teacher.yaml"), "--dry-run", "distill.temperature=0.5")
    assert typed.returncode == 2 and "temperature must be >= 1" in typed.stderr


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(ExperimentConfig, path)


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import make_cfg, fixed_batch
from shd_diffusion.training import Trainer, make_accelerator, sample_generators
from pathlib import Path
tmp = Path({tmp!r})
cfg = make_cfg(tmp, "kd_shd", "dit", ["train.global_batch_size=8"])
acc = make_accelerator(cfg, tmp / "runs" / "t", log=False)
trainer = Trainer(cfg, tmp / "runs" / "t", acc)
x, y = next(trainer._batches())
gens = sample_generators(0, trainer._positions(0, x.shape[0]), trainer.device)
st = trainer.compute_terms(x, y, gens, 0.5)
acc.backward(st.total.mean())
grads = {{n: p.grad.clone() for n, p in acc.unwrap_model(trainer.trained).named_parameters() if p.grad is not None}}
assert acc.num_processes == {n}, acc.num_processes
# What the loop logs: the loss averaged over the ranks, and every rank's alphas.
logged = {{"mean": trainer._global_means({{"loss": st.total.mean().detach()}}, 1)["loss"],
          "local": float(st.total.mean()), "alphas": trainer._gather_alphas(st.alphas)[0]}}
if acc.is_main_process:
    torch.save(grads, tmp / f"grads_{{acc.num_processes}}.pt")
    torch.save(logged, tmp / f"logged_{{acc.num_processes}}.pt")
# Tear down as train() does: drop the DDP reducer, then destroy the gloo group together. A group
# left alive, destroyed while the peer still works, or outlived by the reducer can abort the
# process at exit in C++ ("terminate called without an active exception").
del st
trainer.release()
acc.wait_for_everyone()
acc.end_training()
"""


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process_gradients(tmp_path):
    # make the teacher once, so both launches load the same file
    make_cfg(tmp_path, "kd_shd", "dit")
    script = tmp_path / "ddp_step.py"
    # Without CUDA, accelerate's multi-process launch runs DDP on the CPU with gloo (MULTI_CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for n in (1, 2):
        mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
        script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path), n=n))
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "grads_1.pt", weights_only=True)
    two = torch.load(tmp_path / "grads_2.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) > 10
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-4, msg=k)
    # Logged values cover both ranks: the 2-process mean is the 1-process batch mean, not rank 0's.
    log1, log2 = (torch.load(tmp_path / f"logged_{n}.pt", weights_only=True) for n in (1, 2))
    assert abs(log2["mean"] - log1["mean"]) <= 1e-5 * abs(log1["mean"])
    assert abs(log2["local"] - log1["mean"]) > 1e-4 * abs(log1["mean"])  # rank 0 alone would differ
    assert log2["alphas"].shape == log1["alphas"].shape == (8, 4)  # (global batch, H_t)
    torch.testing.assert_close(log2["alphas"].sum(0), log1["alphas"].sum(0), atol=1e-5, rtol=1e-5)


def test_ema_sample_grid_and_tensorboard_logs(tmp_path):
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["train.steps=2"])
    run_dir = tmp_path / "runs" / "t"
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=True))
    assert list(run_dir.rglob("events.out.tfevents*")), "no TensorBoard event file"
    assert (run_dir / "config.yaml").exists()
    path = trainer.sample_grid(num=4, steps="3")
    from PIL import Image

    img = Image.open(path)
    assert img.size[0] > 32 and img.size[1] > 32  # a 2 x 2 grid of 32 x 32 samples with padding


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.acc.unwrap_model(trainer.trained).student.state_dict().items()}


@pytest.mark.parametrize("family", ["dit", "mdt"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, family):
    # Same global batch of 8: one micro-batch of 8, or two of 4. Every sample keeps its stream
    # position (so its timestep, noise, label drop and MDT keep set) and the MDT mask ratio is
    # per step, so the gradient the optimizer sees agrees up to summation order. (Compared before
    # Adan: its g / sqrt(v) amplifies rounding in near-zero gradients, e.g. of the zero-gated
    # attention at step 1.)
    grads = {}
    for accum in (1, 2):
        reset_accelerate_state()
        cfg = make_cfg(tmp_path / f"a{accum}", "kd_shd", family, ["train.global_batch_size=8", f"train.grad_accum={accum}"])
        trainer = make_trainer(cfg, tmp_path / f"a{accum}")
        student = trainer.acc.unwrap_model(trainer.trained).student
        seen: list[dict[str, torch.Tensor]] = []
        step = trainer.optimizer.step

        def record_then_step() -> None:
            seen.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
            step()

        trainer.optimizer.step = record_then_step
        batches = trainer._batches()
        for _ in range(2):
            trainer.train_step(batches)
        grads[accum] = seen
    assert len(grads[1]) == len(grads[2]) == 2
    for one, two in zip(grads[1], grads[2]):
        assert one.keys() == two.keys() and len(one) > 10
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-4, msg=k)


def test_bf16_run_keeps_fp32_master_weights_and_a_frozen_teacher(tmp_path):
    cfg = make_cfg(tmp_path, "kd_shd", "mdt", ["train.steps=2", "train.precision=bf16"])
    run_dir = tmp_path / "runs" / "t"
    teacher_before = torch.load(cfg.teacher.checkpoint, weights_only=True)
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    assert trainer.step == 2
    student = trainer.acc.unwrap_model(trainer.trained).student
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(v.dtype == torch.float32 for v in trainer.ema.state_dict().values() if v.is_floating_point())
    # The teacher: eval mode, no grad, weights untouched by the run.
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    x0, y, gens = fixed_batch(trainer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        st = trainer.compute_terms(x0, y, gens(), 0.5)
    assert all(torch.isfinite(v).all() for v in st.terms.values())


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["train.steps=3", "train.checkpoint_every=1"])
    trainer = make_trainer(cfg, tmp_path)
    param = next(p for p in trainer.acc.unwrap_model(trainer.trained).student.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("inf") if trainer.step == 1 else g)  # finite loss, inf gradient
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 1.*No checkpoint is healthy "
                                                 r"\(not healthy: step_00000001\.pt\)"):
        trainer.fit(progress=False)
    assert torch.isfinite(param).all()  # the bad update was never applied


def test_head_matching_is_the_same_for_any_micro_batch_split(tmp_path):
    groups = []
    for accum in (1, 2):
        cfg = make_cfg(tmp_path / f"m{accum}", "kd_shd", "dit",
                       ["distill.squeeze=matching", "train.global_batch_size=8", f"train.grad_accum={accum}",
                        "distill.calibration_batches=2"])
        trainer = make_trainer(cfg, tmp_path / f"m{accum}")
        trainer._match_heads()
        groups.append(trainer.groups)
        reset_accelerate_state()
    assert groups[0] == groups[1]
    assert all(sorted(i for g in layer for i in g) == list(range(4)) for layer in groups[0])


def test_data_that_does_not_fit_the_student_is_named(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["student.in_channels=3"])
    trainer = make_trainer(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"1 channels but student.in_channels=3"):
        trainer.dataset
    cfg = make_cfg(tmp_path, "none", "dit", ["student.num_classes=5"])
    with pytest.raises(ValueError, match=r"10 classes but student.num_classes=5"):
        make_trainer(cfg, tmp_path).dataset


def test_image_folder_is_encoded_on_the_fly_with_the_vae(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    vae.save_pretrained(tmp_path / "vae")
    gen = torch.Generator().manual_seed(0)
    for j in range(6):
        img = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
        (tmp_path / "imgs" / f"c{j % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / f"c{j % 2}" / f"{j}.png")
    cfg = make_cfg(tmp_path, "kd", "dit", [
        "data.kind=image_folder", f"data.path={tmp_path / 'imgs'}", f"data.vae={tmp_path / 'vae'}",
        "data.image_size=16", "student.in_channels=4", "student.input_size=8", "student.patch_size=2",
        "teacher.model.in_channels=4", "teacher.model.input_size=8", "teacher.model.patch_size=2",
        "student.num_classes=2", "teacher.model.num_classes=2", "train.steps=2", "train.sample_every=2",
    ])
    run_dir = tmp_path / "runs" / "t"
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    assert trainer.step == 2 and trainer.vae is not None
    x, _ = next(trainer._batches())  # (B, 3, 16, 16) pixels in [-1, 1]
    gens = sample_generators(0, [0, 1], trainer.device)
    z = trainer.encode(x[:2], gens)
    assert z.shape == (2, 4, 8, 8)
    # The encoding is the posterior sample mean + std * noise(seeded per sample), times 0.18215.
    with torch.no_grad():
        dist = vae.encode(x[:2]).latent_dist
    noise = torch.stack([torch.randn((4, 8, 8), generator=g) for g in sample_generators(0, [0, 1], trainer.device)])
    torch.testing.assert_close(z, (dist.mean + dist.std * noise) * 0.18215, atol=1e-5, rtol=1e-5)
    assert (run_dir / "samples" / "step_00000002.png").exists()  # decoded with the same VAE


def test_tensorboard_has_every_term_alpha_stats_and_the_grid_leaves_weights_alone(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["train.steps=2", "train.sample_every=2", "train.figure_every=2"])
    run_dir = tmp_path / "runs" / "t"
    acc = make_accelerator(cfg, run_dir, log=True)
    trainer = train(cfg, run_dir, progress=False, accelerator=acc)
    events = sorted(run_dir.rglob("events.out.tfevents*"))
    assert events
    tags: dict[str, set] = {"scalars": set(), "images": set(), "histograms": set()}
    panels = []
    for ev in events:
        ea = EventAccumulator(str(ev), size_guidance={"images": 0})
        ea.Reload()
        for kind in tags:
            tags[kind] |= set(ea.Tags()[kind])
        if "figures/attention" in ea.Tags()["images"]:
            panels += ea.Images("figures/attention")
    for tag in ("loss", "loss/diffusion", "loss/kd", "loss/shd", "grad_norm", "lr", "throughput/img_per_s",
                "alpha/layer00_min", "alpha/layer00_max", "alpha/layer00_std", "alpha/layer00_zero_frac"):
        assert tag in tags["scalars"], (tag, sorted(tags["scalars"]))
    # Every train.figure_every steps: alpha histograms per SHD layer and the attention panel.
    assert {"alpha/layer00", "alpha/layer01"} <= tags["histograms"], tags["histograms"]
    assert {"figures/attention", "figures/alpha_histograms"} <= tags["images"], tags["images"]
    assert [p.step for p in panels] == [2]
    assert panels[0].height == 40 + 2 * (48 + 4) + 4  # one row of 48 px panels per SHD layer pair (2)
    assert (run_dir / "samples" / "step_00000002.png").exists()
    before = _params(trainer)
    trainer.sample_grid(num=4, steps="3")  # swaps the EMA in and back out
    after = _params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_paper_pair_configs_plan_the_published_mapping():
    from shd_diffusion.training.heads import plan_distillation

    for name, (l_s, l_t, h_t, sizes) in {
        "mdtv2_s2_from_xl2": (12, 28, 16, [3, 3, 3, 3, 2, 2]),
        "mdtv2_s2_from_b2": (12, 12, 12, [2] * 6),
        "dit_s2_from_xl2": (12, 28, 16, [3, 3, 3, 3, 2, 2]),
        "dit_s2_from_b2": (12, 12, 12, [2] * 6),
    }.items():
        cfg = load_config(ExperimentConfig, REPO / "configs" / f"{name}.yaml")
        assert cfg.distill.mode == "kd_shd" and cfg.distill.shd_beta == 2.0
        with torch.device("meta"):
            student, teacher = build_model(cfg.student), build_model(cfg.teacher.model)
        pairs, squeezers = plan_distillation(student, teacher, cfg.distill)
        # Student layer j (1-indexed) <- teacher layer round(j L_t / L_s), halves up.
        assert pairs == [(j - 1, int(j * l_t / l_s + 0.5) - 1) for j in range(1, l_s + 1)], name
        assert all(sq.teacher_heads == h_t and sq.student_heads == 6 for sq in squeezers)
        assert [len(g) for g in squeezers[0].resolved] == sizes, name


@pytest.mark.slow
def test_script_requeue_resumes_in_the_same_folder_and_bad_data_is_one_line(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("{}\n")  # everything comes from the overrides
    args = ["--config", str(cfg_path), *COMMON, *DIT_STUDENT, *_shared("student"), "distill.mode=none",
            f"train.output_dir={tmp_path / 'runs'}", "train.steps=2", "--no-progress"]
    first = run_script(*args, "--max-steps", "1")
    assert first.returncode == 0, first.stderr
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-")
    assert sorted(p.name for p in (folders[0] / "checkpoints").glob("*.pt")) == ["step_00000001.pt"]
    second = run_script(*args)  # the requeued job: same command
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step_00000001.pt" in second.stdout
    assert list((tmp_path / "runs").iterdir()) == folders
    assert (folders[0] / "checkpoints" / "step_00000002.pt").exists()

    bad = run_script("--config", str(cfg_path), "data.kind=latents", f"data.path={tmp_path / 'nowhere'}",
                     f"train.output_dir={tmp_path / 'runs2'}", "distill.mode=none", "--no-progress")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "nowhere" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_checkpoints_and_resumes(tmp_path):
    # What a cluster does on preemption: SIGTERM to the launcher, which forwards it to its workers.
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("{}\n")
    args = ["--config", str(cfg_path), *COMMON, *DIT_STUDENT, *_shared("student"), "distill.mode=none",
            f"train.output_dir={tmp_path / 'runs'}", "train.run_name=t", "train.steps=100000", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "scripts" / "train_mdt_shd.py")]
    proc = subprocess.Popen([*launch, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO)
    run_dir = tmp_path / "runs" / "t"
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists():  # written just before the loop starts
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(3)  # some steps into the loop
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "preempted at step" in out, out[-3000:]
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1, ckpts  # checkpoint_every is 1000: this one is the preemption save
    step = int(ckpts[0].stem.split("_")[1])
    assert step >= 1
    resumed = run_script(*[a for a in args if not a.startswith("train.steps=")], f"train.steps={step + 1}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ckpts[0]} at step {step}" in resumed.stdout
    assert (run_dir / "checkpoints" / f"step_{step + 1:08d}.pt").exists()


def test_train_compile_compiles_the_student_in_place(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):  # the inductor backend is too slow for a unit test
        calls.append(kwargs)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["train.steps=2", "train.compile=true"])
    run_dir = tmp_path / "runs" / "t"
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    assert len(calls) == 1 and trainer.step == 2
    # In place: the checkpoint keeps the plain parameter names (no "_orig_mod." prefix).
    state = torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert all(not k.startswith("_orig_mod") for k in state["model"])


def test_grid_decoder_states(tmp_path, capsys):
    from shd_diffusion.training.previews import GridDecoder

    x = torch.randn(2, 1, 8, 8)
    pixels = GridDecoder("animal_mnist", "unused", 1, torch.device("cpu"), None)
    assert pixels.ready() and pixels.to_pixels(x) is x  # pixel data: nothing to decode
    (tmp_path / "not_a_vae").mkdir()  # a local folder without an AutoencoderKL config
    latents = GridDecoder("latents", str(tmp_path / "not_a_vae"), 4, torch.device("cpu"), None)
    assert not latents.ready() and not latents.ready()  # off, and not retried
    out = capsys.readouterr().out
    assert out.count("sample grids are off: cannot load data.vae=") == 1, out


# ----------------------------------------------------------------------------- what a resume checks (issue 18)

def _flat_fields(tree: dict, prefix: str = "") -> list[str]:
    """Dotted names of a config dict's leaves (lists are values, not branches)."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += _flat_fields(value, name + ".") if isinstance(value, dict) else [name]
    return out


def test_every_config_field_has_exactly_one_resume_rule():
    # A new field must be classified: refused, accepted with a record, or checked by content.
    from shd_diffusion.config import to_dict
    from shd_diffusion.train_config import RESUME_CHANGEABLE_FIELDS, RESUME_CONTENT_FIELDS, RESUME_FIXED_FIELDS

    rules = [*RESUME_FIXED_FIELDS, *RESUME_CHANGEABLE_FIELDS, *RESUME_CONTENT_FIELDS]
    assert len(rules) == len(set(rules)), sorted(f for f in rules if rules.count(f) > 1)
    assert sorted(rules) == sorted(_flat_fields(to_dict(ExperimentConfig())))


def _train(cfg: ExperimentConfig, run_dir: Path, **kwargs) -> Trainer:
    reset_accelerate_state()
    return train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False), **kwargs)


def _history(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_resume_accepts_and_records_a_longer_run_and_a_new_lr(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "t"
    first = _train(make_cfg(tmp_path, "none", "dit", ["train.steps=1"]), run_dir)
    changed = make_cfg(tmp_path, "none", "dit", ["train.steps=3", "optim.lr=5e-4", "train.log_every=2"])
    capsys.readouterr()
    resumed = _train(changed, run_dir)
    assert resumed.step == 3
    out = capsys.readouterr().out
    for line in ("train.steps changed from 1 to 3", "optim.lr changed from 0.001 to 0.0005",
                 "train.log_every changed from 1 to 2"):
        assert f"resume: {line} (allowed on a resume; recorded in history.jsonl)" in out, out
    start, resume = _history(run_dir)
    assert (start["step"], start["resumed_from"], start["changed"]) == (0, None, {})
    assert (resume["step"], resume["resumed_from"]) == (1, "step_00000001.pt")
    assert resume["changed"] == {"train.steps": [1, 3], "optim.lr": [1e-3, 5e-4], "train.log_every": [1, 2]}
    assert start["data_fingerprint"] == resume["data_fingerprint"] == first.dataset.fingerprint()
    assert start["teacher_sha256"] is None
    assert "steps: 3" in (run_dir / "config.yaml").read_text()  # this start's config, the history says the rest
    saved = torch.load(run_dir / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert saved["identity"] == {"teacher_sha256": None, "data_fingerprint": first.dataset.fingerprint()}


def test_resume_checks_the_teacher_by_content_not_by_path(tmp_path, capsys):
    from safetensors.torch import save_file

    from shd_diffusion.models.loading import weights_sha256

    cfg = make_cfg(tmp_path, "kd", "dit", ["train.steps=1"])
    run_dir = tmp_path / "runs" / "t"
    _train(cfg, run_dir)
    original = Path(cfg.teacher.checkpoint)
    saved = torch.load(run_dir / "checkpoints" / "step_00000001.pt", weights_only=True)
    state = torch.load(original, weights_only=True)  # the teacher file: a plain state dict
    assert saved["identity"]["teacher_sha256"] == weights_sha256(state)

    # The same weights moved and stored in another format: accepted, and the new path is recorded.
    moved = tmp_path / "moved" / "teacher.safetensors"
    moved.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(moved))
    cfg_moved = make_cfg(tmp_path, "kd", "dit", ["train.steps=2", f"teacher.checkpoint={moved}"])
    assert _train(cfg_moved, run_dir).step == 2
    assert _history(run_dir)[-1]["changed"]["teacher.checkpoint"] == [str(original), str(moved)]

    # Other weights of the same shapes at the same path (the swap): refused, nothing written.
    save_file({k: -v.contiguous() for k, v in state.items()}, str(moved))
    before = (run_dir / "history.jsonl").read_text()
    cfg_swapped = make_cfg(tmp_path, "kd", "dit", ["train.steps=3", f"teacher.checkpoint={moved}"])
    with pytest.raises(ValueError, match=r"cannot resume: the teacher changed: teacher.checkpoint=\S*teacher"
                                         r".safetensors holds weights [0-9a-f]{16}, the run was trained with "
                                         r"[0-9a-f]{16}"):
        _train(cfg_swapped, run_dir)
    assert (run_dir / "history.jsonl").read_text() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["step_00000001.pt", "step_00000002.pt"]


@pytest.mark.slow
def test_resume_checks_the_data_by_content(tmp_path):
    from test_bad_inputs_train import write_animal_mnist

    data = tmp_path / "data"
    write_animal_mnist(data, pixel=(0, 0, 0))
    run_dir = tmp_path / "runs" / "t"
    _train(make_cfg(tmp_path, "none", "dit", ["train.steps=1", f"data.path={data}"]), run_dir)
    # The same files rewritten with one other pixel (same shapes, same path): refused.
    write_animal_mnist(data, pixel=(9999, 27, 27))
    with pytest.raises(ValueError, match=r"cannot resume: the training data changed: data.path=\S+data "
                                         r"\(data.kind=animal_mnist\) has fingerprint"):
        _train(make_cfg(tmp_path, "none", "dit", ["train.steps=2", f"data.path={data}"]), run_dir)


@pytest.mark.slow
def test_a_checkpoint_from_before_content_checks_still_resumes(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "t"
    _train(make_cfg(tmp_path, "none", "dit", ["train.steps=1"]), run_dir)
    path = run_dir / "checkpoints" / "step_00000001.pt"
    state = torch.load(path, weights_only=True)
    del state["identity"]  # as written before issue 18
    torch.save(state, path)
    # A changed data path cannot be verified against it: refused.
    from test_bad_inputs_train import write_animal_mnist

    write_animal_mnist(tmp_path / "data", pixel=(0, 0, 0))
    with pytest.raises(ValueError, match=r"data.path changed from None to \S+data.*predates content checks"):
        _train(make_cfg(tmp_path, "none", "dit", ["train.steps=2", f"data.path={tmp_path / 'data'}"]), run_dir)
    # Same paths: resumed, saying that the content was not verified; the next checkpoint records it.
    capsys.readouterr()
    assert _train(make_cfg(tmp_path, "none", "dit", ["train.steps=2"]), run_dir).step == 2
    assert "step_00000001.pt predates content checks" in capsys.readouterr().out
    assert "identity" in torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=True)


def test_fingerprints_change_with_the_data_and_not_with_a_move(tmp_path):
    import shutil

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from shd_diffusion.data import ImageFolderDataset, LatentDataset

    def image_folder(root: Path) -> str:
        return ImageFolderDataset(root, image_size=8).fingerprint()

    for k, name in enumerate(("cat", "dog")):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "img" / name / "a.png")
    base = image_folder(tmp_path / "img")
    shutil.copytree(tmp_path / "img", tmp_path / "img_moved")
    assert image_folder(tmp_path / "img_moved") == base  # a moved folder is the same data
    (tmp_path / "img" / "dog" / "a.png").rename(tmp_path / "img" / "dog" / "b.png")
    assert image_folder(tmp_path / "img") != base  # renamed
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)).save(
        tmp_path / "img_moved" / "cat" / "a.png")
    assert image_folder(tmp_path / "img_moved") != base  # replaced by a file of another size

    def latents(root: Path, labels: list[int], count: int = 2) -> str:
        import json

        root.mkdir()
        save_file({"latents": torch.zeros(count, 4, 2, 2), "labels": torch.tensor(labels[:count])},
                  str(root / "shard_00000.safetensors"))
        index = {"format": "shd_latents/1", "image_size": 16, "scale_factor": 0.18215, "both_flips": False,
                 "latent_shape": [4, 2, 2], "classes": ["a", "b"], "num_images": count,
                 "shards": [{"name": "shard_00000.safetensors", "count": count}]}
        (root / "index.json").write_text(json.dumps(index))
        return LatentDataset(root).fingerprint()

    same = latents(tmp_path / "lat_a", [0, 1])
    assert latents(tmp_path / "lat_b", [0, 1]) == same
    assert latents(tmp_path / "lat_c", [1, 0]) != same  # relabelled: same shapes, same sizes


def test_memory_bound_is_below_the_measured_peak_and_refuses_a_huge_batch(tmp_path):
    # The refusal must never hit a batch that fits: the bound stays below what a step really uses.
    from shd_diffusion.cli import BadInput
    from shd_diffusion.profiling import cpu_peak_bytes
    from shd_diffusion.training.memory import activation_bytes_per_image, check_batch_fits

    for family in ("dit", "mdt"):
        cfg = make_cfg(tmp_path / family, "none", family, ["train.global_batch_size=8"])
        trainer = make_trainer(cfg, tmp_path / family)
        x0, y, gens = fixed_batch(trainer, n=4)

        def step():
            trainer.acc.backward(trainer.compute_terms(x0, y, gens(), 0.5).total.mean())

        bound = activation_bytes_per_image(trainer.student, "fp32", False) * 4
        peak = cpu_peak_bytes(step)
        assert 0 < bound < peak, family
        with pytest.raises(BadInput, match=r"global_batch_size=8 cannot fit: a micro-batch of 1000000000000 images"):
            check_batch_fits(trainer.student, 10**12, 1, cfg.train, torch.device("cpu"))
        check_batch_fits(trainer.student, 256, 1, cfg.train, torch.device("cpu"))
