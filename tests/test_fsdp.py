"""FSDP2: the sharded student trains like the 1-process student, checkpoints cross world sizes, refusals.

The launched runs use torch's ``fully_shard`` on the CPU over gloo (2 processes), which torch
2.14 supports; accelerate itself applies FSDP only on GPUs, so the trainer shards the student
itself (:mod:`shd_diffusion.training.sharding`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from shd_diffusion.config import ConfigError
from shd_diffusion.training import check_launch
from shd_diffusion.training.sharding import check_teacher_apart
from test_training import COMMON, DIT_STUDENT, REPO, _shared, make_cfg

# A tiny kd_shd run, 4 steps with checkpoints at steps 2 and 4: class-conditional (DiT 2 x 32
# student, 4 x 48 teacher, or MDTv2 4 x 32 / 6 x 48 with its masked pass; global batch 8) or text-to-image (test_t2i_training's FLUX.1, 4 -> 2
# heads, global batch 4). Every rank reports on the sharding, the teacher and the SHD capture.
CONFIGS = {
    "dit": "from test_training import make_cfg\n"
           "cfg = make_cfg(tmp, 'kd_shd', 'dit', ['train.global_batch_size=8', *common])",
    "mdt": "from test_training import make_cfg\n"
           "cfg = make_cfg(tmp, 'kd_shd', 'mdt', ['train.global_batch_size=8', *common])",
    "flux": "from test_t2i_training import make_cfg\n"
            "cfg = make_cfg(tmp, 'flux', common)",
}
RUN_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from torch.distributed.tensor import DTensor
from shd_diffusion import objective
from shd_diffusion.training import make_accelerator, train

tmp, name = Path({tmp!r}), {name!r}
common = ["train.steps=4", "train.checkpoint_every=2", f"train.run_name={{name}}", *{extra!r}]
{config}
out_weights = []
def recording(shd_terms):
    def wrapped(self, s, t, squeezers):
        out_weights.extend(t.out_weights)  # what the SHD squeeze reads of the teacher
        return shd_terms(self, s, t, squeezers)
    return wrapped
for cls in (objective.DistillationObjective, objective.WholeMapObjective):
    cls.shd_terms = recording(cls.__dict__["shd_terms"])

run_dir = tmp / "runs" / name
acc = make_accelerator(cfg, run_dir, log=False)
trainer = train(cfg, run_dir, progress=False, accelerator=acc)
teacher_params = list(trainer.teacher.parameters())
optimized = {{id(p) for g in trainer.optimizer.param_groups for p in g["params"]}}
student = list(trainer.student.parameters())
report = {{
    "world": acc.num_processes,
    "sharded": trainer.sharded,
    "student_dtensors": sum(isinstance(p, DTensor) for p in student),
    "student_params": len(student),
    "param_names": [n for n, _ in trainer.acc.unwrap_model(trainer.trained).named_parameters()],  # optimizer order
    "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in student),
    "teacher_requires_grad": sum(p.requires_grad for p in teacher_params),
    "teacher_grads": sum(p.grad is not None for p in teacher_params),
    "teacher_in_optimizer": sum(id(p) in optimized for p in teacher_params),
    "teacher_dtensors": sum(isinstance(p, DTensor) for p in teacher_params),
    "out_weights": len(out_weights),
    "out_weights_dtensor": sum(isinstance(w, DTensor) for w in out_weights),
    # DiT: (D, H*d) = (D, D), each block's attn.proj weight, whole
    "out_weight_shapes_ok": all(tuple(w.shape) == (trainer.teacher.config.hidden_size,) * 2 for w in out_weights)
                            if hasattr(trainer.teacher, "blocks") else True,
}}
(tmp / f"report_{{name}}_rank{{acc.process_index}}.json").write_text(json.dumps(report))
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(tmp: Path, name: str, processes: int, fsdp: bool, extra: tuple[str, ...] = (), model: str = "dit") -> None:
    script = tmp / f"run_{name}.py"
    script.write_text(RUN_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp), name=name, extra=list(extra),
                                        config=CONFIGS[model]))
    mode = (["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]) if processes > 1 else ["--cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, cwd=tmp, env=ENV, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _ckpt(tmp: Path, name: str, step: int) -> dict:
    """A run's checkpoint, with the parameter names its launch reported (rank 0)."""
    state = torch.load(tmp / "runs" / name / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)
    state["param_names"] = json.loads((tmp / f"report_{name}_rank0.json").read_text())["param_names"]
    return state


def _seed_run(tmp: Path, source: str, name: str, step: int) -> None:
    """A run folder holding only ``source``'s checkpoint of ``step`` (resumed by --resume auto)."""
    dest = tmp / "runs" / name / "checkpoints"
    dest.mkdir(parents=True)
    shutil.copy(tmp / "runs" / source / "checkpoints" / f"step_{step:08d}.pt", dest)


# fp32 on one CPU: the 2-process gradient is the reduce-scatter average of two half-batch means,
# the 1-process one the mean of the whole batch, so they differ by summation order only. Measured
# after 4 Adan steps: 9e-8 absolute (3e-6 relative) at most in the weights and the EMA.
TOL = {"atol": 1e-6, "rtol": 1e-5}
LR, STEPS = 1e-3, 4


def _split_key_bias(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rest, the key bias) of a qkv bias; other tensors whole.

    The key bias adds q . b_k to every score of a query's row, which softmax ignores: its exact
    gradient is 0, so its computed one is rounding noise, and Adan's g / sqrt(v) turns any noise
    into steps of about lr. Two summation orders then move it differently (by up to lr per step).
    """
    if not name.endswith("attn.qkv.bias") or tensor.dim() != 1:
        return tensor, None
    d = tensor.shape[0] // 3
    return torch.cat([tensor[:d], tensor[2 * d:]]), tensor[d:2 * d]


def _assert_close_param(name: str, got: torch.Tensor, want: torch.Tensor, what: str, tol: dict) -> None:
    (rest_g, key_g), (rest_w, key_w) = _split_key_bias(name, got), _split_key_bias(name, want)
    torch.testing.assert_close(rest_g, rest_w, **tol, msg=f"{what}: {name}")
    if key_w is not None:
        assert (key_g - key_w).abs().max() <= 2 * LR * STEPS, f"{what}: key bias of {name} moved more than Adan can"


def _assert_same_training(a: dict, b: dict, what: str, tol: dict = TOL) -> None:
    """Weights, EMA, optimizer state and the per-step losses and grad norms of two runs agree.

    ``a`` is a run folder's checkpoint plus ``param_names``: the trained parameters' names in the
    optimizer's numbering (torch numbers them in ``named_parameters`` order).
    """
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            _assert_close_param(k, b[part][k], a[part][k], f"{what}: {part}", tol)
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    names = [n.removeprefix("student.") for n in a["param_names"]]
    assert len(names) == len(opt_a["param_groups"][0]["params"])
    for pid in opt_a["state"]:
        for k, v in opt_a["state"][pid].items():
            _assert_close_param(names[int(pid)], opt_b["state"][pid][k], v, f"{what}: optimizer {k}", tol)
    hist_a, hist_b = torch.tensor(a["health"]["history"]), torch.tensor(b["health"]["history"])  # (steps, 3)
    assert hist_a.shape == hist_b.shape and len(hist_a) > 0
    torch.testing.assert_close(hist_b, hist_a, atol=1e-6, rtol=1e-6)  # step, global mean loss, grad norm


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_checkpoints_cross_world_sizes(tmp_path):
    make_cfg(tmp_path, "kd_shd", "dit")  # the random teacher file, once, for every launch
    _launch(tmp_path, "one", 1, fsdp=False)
    _launch(tmp_path, "fsdp", 2, fsdp=True)
    reports = [json.loads((tmp_path / f"report_fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["sharded"]
        assert rep["student_dtensors"] == rep["student_params"] > 10  # every student parameter sharded
        # The teacher: whole on every rank, frozen, no gradients, not optimized.
        assert rep["teacher_dtensors"] == rep["teacher_requires_grad"] == rep["teacher_grads"] == 0
        assert rep["teacher_in_optimizer"] == 0
        # SHD read the teacher's out-projection weights as full plain tensors, every step.
        assert rep["out_weights"] >= 4 and rep["out_weights_dtensor"] == 0 and rep["out_weight_shapes_ok"]
    one = json.loads((tmp_path / "report_one_rank0.json").read_text())
    assert reports[0]["local_numel"] + reports[1]["local_numel"] == one["local_numel"]  # shards partition it

    one_final, fsdp_final = _ckpt(tmp_path, "one", 4), _ckpt(tmp_path, "fsdp", 4)
    # Same names, shapes and dtypes as a 1-process checkpoint: the format is world-size free.
    assert {k: (v.shape, v.dtype) for k, v in fsdp_final["model"].items()} == \
        {k: (v.shape, v.dtype) for k, v in one_final["model"].items()}
    _assert_same_training(one_final, fsdp_final, "2-process FSDP vs 1 process")
    assert [s for s, _, _ in fsdp_final["health"]["history"]] == [1, 2, 3, 4]

    # A 1-process checkpoint resumes under 2-process FSDP, and a FSDP one in 1 process.
    _seed_run(tmp_path, "one", "one_to_fsdp", 2)
    _launch(tmp_path, "one_to_fsdp", 2, fsdp=True)
    _assert_same_training(one_final, _ckpt(tmp_path, "one_to_fsdp", 4), "resumed 1 -> 2 FSDP")
    _seed_run(tmp_path, "fsdp", "fsdp_to_one", 2)
    _launch(tmp_path, "fsdp_to_one", 1, fsdp=False)
    _assert_same_training(one_final, _ckpt(tmp_path, "fsdp_to_one", 4), "resumed 2 FSDP -> 1")

    # Gradient accumulation (reduce-scatter on the last micro-batch only) and the student's own
    # activation checkpointing under FSDP: still the 1-process run.
    _launch(tmp_path, "fsdp_accum", 2, fsdp=True, extra=("train.grad_accum=2", "train.grad_checkpointing=true"))
    _assert_same_training(one_final, _ckpt(tmp_path, "fsdp_accum", 4), "2-process FSDP, grad_accum=2, checkpointing")


def _fsdp_env(monkeypatch, **extra: str) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("env, overrides, expected", [
    ({"FSDP_VERSION": "1"}, [], "launch with --fsdp_version 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, [], "--fsdp_offload_params false"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], "train.grad_checkpointing=true"),
    ({}, ["train.compile=true"], "train.compile=false"),
    ({}, ["train.sample_every=10"], "set both to 0 under FSDP"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], "conflicts with train.precision=fp32"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, ["train.precision=bf16"], "fp32 and bf16 only"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "does not support it"),
])
def test_fsdp_launch_refusals(tmp_path, monkeypatch, env, overrides, expected):
    cfg = make_cfg(tmp_path, "none", "dit", overrides)
    _fsdp_env(monkeypatch, **env)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_launch(cfg)


def test_fsdp_launch_accepts_the_supported_settings(tmp_path, monkeypatch):
    _fsdp_env(monkeypatch, ACCELERATE_MIXED_PRECISION="bf16", FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT")
    check_launch(make_cfg(tmp_path, "none", "dit", ["train.precision=bf16", "train.grad_checkpointing=true"]))


def test_a_teacher_that_could_train_is_refused():
    teacher, student = nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="requires grad: freeze it"):
        check_teacher_apart(teacher, student)
    teacher.requires_grad_(False)
    check_teacher_apart(teacher, student)  # frozen and separate: fine
    shared = nn.Linear(4, 4)
    shared.weight = teacher.weight  # the student reuses the teacher's tensor
    with pytest.raises(ConfigError, match="shares its storage with the student"):
        check_teacher_apart(teacher, shared)


@pytest.mark.slow
def test_fsdp_refusal_is_one_error_line_and_writes_nothing(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("{}\n")
    env = {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_mdt_shd.py"), "--config", str(cfg_path), *COMMON,
         *DIT_STUDENT, *_shared("student"), "distill.mode=none", f"train.output_dir={tmp_path / 'runs'}",
         "train.run_name=bad", "train.compile=true", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.compile=true with FSDP"), proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_fsdp_text_to_image_student_matches_one_process(tmp_path):
    # FLUX.1: double- and single-stream block lists, joint attention captured for SHD.
    _launch(tmp_path, "one", 1, fsdp=False, model="flux")
    _launch(tmp_path, "fsdp", 2, fsdp=True, model="flux")
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"report_fsdp_rank{rank}.json").read_text())
        assert rep["sharded"] and rep["student_dtensors"] == rep["student_params"] > 10
        assert rep["teacher_dtensors"] == rep["teacher_grads"] == rep["teacher_in_optimizer"] == 0
        assert rep["out_weights"] >= 4 and rep["out_weights_dtensor"] == 0
    # AdamW at lr 2e-3: measured 3.4e-6 at most (single_transformer_blocks.0.proj_out.weight, |w| <= 0.12)
    _assert_same_training(_ckpt(tmp_path, "one", 4), _ckpt(tmp_path, "fsdp", 4), "FLUX.1: 2-process FSDP vs 1",
                          tol={"atol": 1e-5, "rtol": 1e-5})


def test_training_state_bytes_of_flux_on_eight_gpus():
    from shd_diffusion.training.memory import training_state_bytes

    student, teacher = 2_247_716_928, 11_901_408_320  # FLUX.1-dev -> flux1_student.yaml (test_t2i_models)
    shard = student // 8  # 280,964,616: divides exactly
    fsdp = training_state_bytes(student, teacher, 8)
    # fp32 weight + grad + Adan's 4 state tensors + EMA = 28 bytes per student parameter, over 8 GPUs;
    # the bf16 teacher whole on each: 23.8 GB.
    assert fsdp == {"weights": 4 * shard, "grads": 4 * shard, "optimizer": 16 * shard, "ema": 4 * shard,
                    "teacher": 2 * teacher, "total": 28 * shard + 2 * teacher} and fsdp["total"] == 31_669_825_888
    ddp = training_state_bytes(student, teacher, 8, shard_student=False)
    assert ddp["total"] == 28 * student + 2 * teacher == 86_738_890_624  # over an 80 GiB card (85.9e9 bytes)
    assert training_state_bytes(student, teacher, 8, optimizer="adamw")["optimizer"] == 8 * shard
    assert training_state_bytes(10, 7, 4, shard_teacher=True)["teacher"] == 2 * 2  # ceil(7 / 4) parameters


@pytest.mark.slow
def test_fsdp_mdt_student_with_its_masked_pass_matches_one_process(tmp_path):
    # MDTv2: four block lists (encoder in / out, decoder, side block) and a second, masked student pass.
    make_cfg(tmp_path, "kd_shd", "mdt")
    _launch(tmp_path, "one", 1, fsdp=False, model="mdt")
    _launch(tmp_path, "fsdp", 2, fsdp=True, model="mdt")
    rep = json.loads((tmp_path / "report_fsdp_rank1.json").read_text())
    assert rep["sharded"] and rep["student_dtensors"] == rep["student_params"] > 10
    assert rep["teacher_grads"] == rep["teacher_in_optimizer"] == rep["out_weights_dtensor"] == 0
    # Losses to 1e-7; weights measured 2.6e-6 at most (en_outblocks.0.attn.qkv.weight, |w| <= 0.22) besides the key bias
    _assert_same_training(_ckpt(tmp_path, "one", 4), _ckpt(tmp_path, "fsdp", 4), "MDTv2: 2-process FSDP vs 1",
                          tol={"atol": 1e-5, "rtol": 1e-5})
