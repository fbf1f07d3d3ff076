"""The distillation objective (shd_diffusion.objective) inside Trainer.train_step: q/k capture +
chunked SHD against the whole-map path it replaced, weights in one place, a step at N = 1024."""

from __future__ import annotations

import itertools

import pytest
import torch
from shd_diffusion.profiling import cpu_peak_bytes as peak_bytes

from shd_diffusion import shd
from shd_diffusion.families.mdt import MDT
from shd_diffusion.objective import WholeMapObjective, weighted_total
from shd_diffusion.train_config import DistillConfig
from test_training import fixed_batch, make_cfg, make_trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def one_step(trainer, x, y, whole_maps=False):
    """Student weights before and after one train_step on a fixed batch, and that batch's terms."""
    if whole_maps:
        trainer.objective = WholeMapObjective.like(trainer.objective)
    student = trainer.acc.unwrap_model(trainer.trained).student
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(x))]
    with torch.no_grad():
        st = trainer.compute_terms(x, y, gens, 0.5)
    trainer.train_step(itertools.repeat((x, y)))
    return before, {k: v.detach().clone() for k, v in student.state_dict().items()}, st


@pytest.mark.parametrize(
    "family, extra",
    [
        ("dit", ["distill.temperature=2.0"]),
        ("mdt", ["distill.temperature=2.0", "distill.chunk_size=5"]),  # relative-position biases, 16 = 3 x 5 + 1 rows
        ("dit", ["distill.loss=mse", "distill.reduction=mean", "distill.squeeze=progressive", "distill.chunk_size=3"]),
    ],
)
def test_train_step_update_equals_the_whole_map_path(tmp_path, family, extra):
    # Same weights, batch and noise: the update must match the path it replaced. The gradients
    # agree to ~5e-7 of their largest entry (measured; block sums, log_softmax vs log of softmax,
    # and the student's fused vs explicit attention reorder float32 roundings). Adan's first step
    # is lr * g / (|g| + eps): with the default eps = 1e-8 it maps a rounding-level change of a
    # near-zero gradient entry to a change of up to lr, so the step uses eps = 1e-3, which bounds
    # the weight change by lr * |dg| / eps ~ 1e-3 * 1e-7 / 1e-3 = 1e-7. 1e-6 = lr / 1000 still fails
    # a wrong alpha, a dropped bias gradient or a missing row (each moves gradients by >= 1e-3).
    extra = [*extra, "optim.eps=1e-3"]
    cfg = make_cfg(tmp_path / "new", "kd_shd", family, extra)
    new = make_trainer(cfg, tmp_path / "new")
    x, y, _ = fixed_batch(new)
    w0, w_new, st_new = one_step(new, x, y)
    cfg_old = make_cfg(tmp_path / "old", "kd_shd", family, extra)
    _, w_old, st_old = one_step(make_trainer(cfg_old, tmp_path / "old"), x, y, whole_maps=True)
    torch.testing.assert_close(st_new.terms["shd"], st_old.terms["shd"], rtol=1e-5, atol=0)
    for a, b in zip(st_new.alphas, st_old.alphas):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert float(st_new.terms["shd"].min()) > 0
    moved = max(float((w_new[k] - w_old[k]).abs().max()) for k in w_new)
    step = max(float((w_new[k] - w0[k]).abs().max()) for k in w_new)
    print(f"max |w_new - w_old| {moved:.2e}, step {step:.2e}")
    assert moved < 1e-6
    assert step > 1e-4  # the step itself is large: the comparison is not vacuous


def test_weights_apply_in_one_place():
    dc = DistillConfig(kd_weight=0.5, shd_beta=2.0, feature_weight=3.0)
    ones = torch.ones(2)
    terms = {"diffusion": ones, "diffusion_masked": 2 * ones, "kd": ones, "shd": ones, "feature": ones}
    assert torch.equal(weighted_total(terms, dc, MDT.extra_terms), torch.full((2,), 1 + 2 + 0.5 + 2.0 + 3.0))
    with pytest.raises(KeyError):  # a family term only counts for the family that declares it
        weighted_total(terms, dc)
    with pytest.raises(KeyError):
        weighted_total({"diffusion": ones, "unknown": ones}, dc)


def test_a_training_step_at_1024_tokens_stays_within_its_memory_bound(tmp_path):
    # A real KD + SHD step (DiT, 64 x 64 latents with patch 2 = 1024 tokens, 4 -> 2 heads, batch 2,
    # 64-row blocks). One whole float32 teacher map stack of one layer is 2 * 4 * 1024^2 * 4 B =
    # 32 MiB, and the whole-map path holds several per layer (teacher probs + maps + outputs, the
    # student's logits/probs/maps with graph). The bound: the whole step's peak allocation stays
    # below that single stack. Measured (CPU allocator, whole step incl. weights, optimizer and
    # activations): 24 MiB; the same step with KD only 16 MiB; the whole-map path 319 MiB.
    narrow = ["student.name=DiT-S/2", "teacher.model.name=DiT-S/2", "student.input_size=64",
              "teacher.model.input_size=64", "distill.chunk_size=64", "distill.temperature=2.0",
              "train.global_batch_size=2"]
    cfg = make_cfg(tmp_path, "kd_shd", "dit", narrow)
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.objective.num_tokens == 1024
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    batches = itertools.repeat((x, torch.tensor([1, 2])))
    trainer.train_step(batches)  # warm-up: optimizer state and lazy buffers exist from here on
    before = {k: v.clone() for k, v in trainer.acc.unwrap_model(trainer.trained).student.state_dict().items()}
    peak = peak_bytes(lambda: trainer.train_step(batches))
    assert peak < 2 * 4 * 1024**2 * 4, peak / 2**20
    after = trainer.acc.unwrap_model(trainer.trained).student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train


@pytest.mark.parametrize("name, student_heads", [("dit_s2_from_xl2_512", 6), ("dit_b2_from_xl2_512", 12)])
def test_512px_configs_resolve_to_1024_tokens(name, student_heads):
    from pathlib import Path

    from shd_diffusion.config import load_config
    from shd_diffusion.models.registry import MODEL_CONFIGS
    from shd_diffusion.train_config import ExperimentConfig

    cfg = load_config(ExperimentConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    for model in (cfg.student, cfg.teacher.model):
        patch = MODEL_CONFIGS[model.name].keywords["patch_size"]
        assert (model.input_size // patch) ** 2 == 1024
    assert MODEL_CONFIGS[cfg.student.name].keywords["num_heads"] == student_heads and cfg.distill.chunk_size is None
    # The automatic block at the paper's per-GPU batch (256 over 8 GPUs) is a fraction of N.
    assert 16 <= shd.auto_chunk_size(32, 16, student_heads, 1024) < 1024


def _train_main():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_mdt_shd.py"
    spec = importlib.util.spec_from_file_location("train_mdt_shd_for_objective", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["distill.chunk_size=0"], ["distill.chunk_size", ">= 1"]),
        (["distill.chunk_size=-3"], ["distill.chunk_size"]),
        # Student and teacher token grids differ (16 vs 64 tokens): the layer pairs' q/k cannot meet.
        (["teacher.model.input_size=64"], ["tokens", "same token grid"]),
    ],
)
def test_bad_shd_settings_are_one_line_before_any_step(tmp_path, extra, needles):
    from cli_cases import assert_refused, call, snapshot
    from test_training import COMMON, DIT_STUDENT, DIT_TEACHER, _shared

    make_cfg(tmp_path, "kd_shd", "dit")  # writes tmp_path/teacher_dit.pt
    argv = [*COMMON, *DIT_STUDENT, *_shared("student"), *DIT_TEACHER, *_shared("teacher.model"), "distill.mode=kd_shd",
            f"teacher.checkpoint={tmp_path / 'teacher_dit.pt'}", "train.steps=2", f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=r", "--no-progress", *extra]
    before = snapshot(tmp_path)
    assert_refused(call(_train_main(), argv), *needles)
    assert snapshot(tmp_path) == before
