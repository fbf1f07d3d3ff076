"""Every bad input of ``scripts/train_mdt_shd.py`` ends in one line, exit 2, nothing written or lost.

Each row calls the script's ``main`` in-process with a tiny config (the models of
tests/test_training.py) and checks, through tests/cli_cases.py: the exit code, that the message
names the cause, that no traceback is printed, and that the watched folder is byte-for-byte as
before. Divergence (exit 3), a full disk and ``--debug`` have their own tests below.
"""

from __future__ import annotations

import errno
import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_cases import assert_refused, call, snapshot
from conftest import reset_accelerate_state
from test_training import COMMON, DIT_STUDENT, DIT_TEACHER, REPO, _shared, make_cfg

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

_spec = importlib.util.spec_from_file_location("train_mdt_shd", REPO / "scripts" / "train_mdt_shd.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A teacher checkpoint, broken files and folders that the rows point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_cfg(root, "kd", "dit")  # writes root/teacher_dit.pt (random weights, plain state dict)
    (root / "empty.pt").write_bytes(b"")
    (root / "random.pt").write_bytes(bytes(range(256)) * 8)
    (root / "a_file").write_text("not a folder\n")
    (root / "empty_dir").mkdir()
    (root / "broken.yaml").write_text("train: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    held = root / "runs" / "held" / "checkpoints"
    held.mkdir(parents=True)
    torch.save({"step": 1}, held / "step_00000001.pt")  # a folder that already holds a checkpoint
    files = {"root": root, "teacher": root / "teacher_dit.pt"}
    # The same teacher architecture with other weights, and the demo data with one pixel changed:
    # what a resume must tell apart by content, whatever their paths.
    state = torch.load(files["teacher"], weights_only=True)
    torch.save({k: v * 1.01 for k, v in state.items()}, root / "teacher_other.pt")
    write_animal_mnist(root / "animal_other", pixel=(17, 14, 14))
    # Real runs to resume with changed settings: two steps without a teacher, one step of KD + SHD.
    for extra in (["distill.mode=none", "train.steps=2", "train.run_name=trained"],
                  ["distill.mode=kd_shd", "train.steps=1", "train.run_name=trained_kd"]):
        done = call(train_script.main, _argv(files, *extra, "train.log_with=none"))
        assert done.code == 0, done.stderr
        reset_accelerate_state()
    return files


def write_animal_mnist(folder: Path, pixel: tuple[int, int, int]) -> None:
    """A copy of the installed Animal-MNIST files with one pixel (image, row, column) inverted."""
    from shd_diffusion.data import animal_mnist_dir
    from shd_diffusion.data.animal_mnist import _load_gzip_array

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        array = _load_gzip_array(animal_mnist_dir() / name, "reinstall")
        if array.ndim == 3:
            array = array.copy()
            array[pixel] = 255 - array[pixel]
        with gzip.open(folder / name, "wb") as f:
            pickle.dump(array, f, protocol=4)  # protocol 5 would pickle other globals than the loader allows


def _argv(files: dict[str, Path], *extra: str) -> list[str]:
    root = files["root"]
    return [*COMMON, *DIT_STUDENT, *_shared("student"), *DIT_TEACHER, *_shared("teacher.model"),
            "distill.mode=kd", f"teacher.checkpoint={files['teacher']}", "train.steps=2",
            f"train.output_dir={root / 'runs'}", "train.run_name=r", "--no-progress", *extra]


# (id, extra argv with {root} / {teacher} placeholders, environment, needles the message must name)
CASES = [
    ("heads_zero", ["student.num_heads=0"], {}, ["student.num_heads", ">= 1"]),
    ("heads_not_dividing", ["student.hidden_size=30", "student.num_heads=4"], {}, ["student.hidden_size", "divisible"]),
    ("unknown_key", ["train.stepz=3"], {}, ["unknown config key train.stepz"]),
    ("temperature_inf", ["distill.temperature=.inf"], {}, ["distill.temperature", "finite"]),
    ("temperature_nan", ["distill.temperature=.nan"], {}, ["distill.temperature", "finite"]),
    ("temperature_below_one", ["distill.temperature=0.5"], {}, ["distill.temperature", ">= 1"]),
    ("shd_beta_inf", ["distill.shd_beta=.inf"], {}, ["distill.shd_beta", "finite"]),
    ("kd_weight_nan", ["distill.kd_weight=.nan"], {}, ["distill.kd_weight", "finite"]),
    ("kd_weight_negative", ["distill.kd_weight=-1"], {}, ["distill.kd_weight", ">= 0"]),
    ("max_grad_norm_negative", ["optim.max_grad_norm=-1"], {}, ["optim.max_grad_norm", "0 disables"]),
    ("lr_negative", ["optim.lr=-1"], {}, ["optim.lr", "> 0"]),
    ("lr_zero", ["optim.lr=0"], {}, ["optim.lr"]),
    ("lr_text", ["optim.lr=fast"], {}, ["optim.lr", "expected a number"]),
    ("eps_negative", ["optim.eps=-1e-8"], {}, ["optim.eps"]),
    ("betas_count", ["optim.betas=[0.9,0.99]"], {}, ["optim.betas", "takes 3 betas"]),
    ("warmup_negative", ["optim.warmup_steps=-5"], {}, ["optim.warmup_steps"]),
    ("ema_decay_one", ["train.ema_decay=1.0"], {}, ["train.ema_decay"]),
    ("healthy_factor", ["train.healthy_factor=1"], {}, ["train.healthy_factor"]),
    ("figure_every_negative", ["train.figure_every=-1"], {}, ["train.figure_every"]),
    ("log_with_unknown", ["train.log_with=mlflow"], {}, ["train.log_with", "tensorboard"]),
    ("max_steps_zero", ["--max-steps", "0"], {}, ["--max-steps"]),
    ("batch_not_divisible", ["train.global_batch_size=3", "train.grad_accum=2"], {}, ["global_batch_size", "divisible"]),
    ("teacher_missing", ["teacher.checkpoint={root}/missing.pt"], {}, ["missing.pt", "does not exist"]),
    ("teacher_not_set", ["teacher.checkpoint=null"], {}, ["teacher.checkpoint"]),
    ("teacher_empty", ["teacher.checkpoint={root}/empty.pt"], {}, ["empty.pt", "empty"]),
    ("teacher_random_bytes", ["teacher.checkpoint={root}/random.pt"], {}, ["random.pt"]),
    ("teacher_wrong_width", ["teacher.model.hidden_size=64"], {}, ["hidden"]),
    ("student_layers_range", ["distill.mode=kd_shd", "distill.student_layers=[7]"], {}, ["student_layers", "out of range"]),
    ("resume_plain_state_dict", ["--resume", "{teacher}"], {}, ["not a training checkpoint", "teacher.checkpoint"]),
    ("resume_missing_path", ["--resume", "{root}/nope.pt"], {}, ["nope.pt", "no such checkpoint"]),
    ("resume_step_not_held", ["--resume", "step=7"], {}, ["step=7", "does not exist"]),
    ("resume_step_not_int", ["--resume", "step=last"], {}, ["step=last", "integer"]),
    ("resume_changed_shape", ["distill.mode=none", "student.depth=3", "train.run_name=trained"], {},
     ["cannot resume", "student.depth changed from 2 to 3"]),
    ("resume_changed_seed", ["distill.mode=none", "train.seed=1", "train.run_name=trained"], {},
     ["train.seed changed"]),
    # What the run depends on by content (issue 18): other teacher weights or data of the same shapes.
    ("resume_swapped_teacher", ["distill.mode=kd_shd", "train.run_name=trained_kd", "train.steps=1",
                                "teacher.checkpoint={root}/teacher_other.pt"], {},
     ["cannot resume", "the teacher changed", "teacher_other.pt", "original teacher", "train.run_name"]),
    ("resume_changed_data", ["distill.mode=none", "train.run_name=trained", "data.path={root}/animal_other"], {},
     ["cannot resume", "training data changed", "animal_other", "original data", "train.run_name"]),
    # The objective, the EMA and the optimizer's betas: refused, a run trained on two is described by neither.
    ("resume_changed_shd_beta", ["distill.mode=kd_shd", "train.run_name=trained_kd", "train.steps=1",
                                 "distill.shd_beta=0.5"], {},
     ["distill.shd_beta changed from 2.0 to 0.5", "train.run_name"]),
    ("resume_changed_temperature", ["distill.mode=kd_shd", "train.run_name=trained_kd", "train.steps=1",
                                    "distill.temperature=2"], {}, ["distill.temperature changed from 1.0 to 2.0"]),
    ("resume_changed_ema_decay", ["distill.mode=none", "train.run_name=trained", "train.ema_decay=0.5"], {},
     ["train.ema_decay changed from 0.9 to 0.5"]),
    ("resume_changed_betas", ["distill.mode=none", "train.run_name=trained", "optim.betas=[0.9,0.9,0.9]"], {},
     ["optim.betas changed from None to [0.9, 0.9, 0.9]"]),
    ("resume_steps_below_done", ["distill.mode=none", "train.run_name=trained", "train.steps=1"], {},
     ["train.steps=1 is below the 2 steps already done", "step_00000002.pt", "--resume step=N"]),
    # A batch that cannot fit is refused before a run folder exists (it used to be killed for memory).
    ("batch_cannot_fit", ["train.global_batch_size=100000000"], {},
     ["train.global_batch_size=100000000 cannot fit", "GiB", "train.grad_accum"]),
    ("resume_none_into_held", ["train.run_name=held", "--resume", "none"], {}, ["--resume none", "already holds"]),
    ("output_dir_is_file", ["train.output_dir={root}/a_file"], {}, ["a_file", "is a file"]),
    ("data_path_empty", ["data.path="], {}, ["data.path is empty"]),
    ("data_path_no_files", ["data.path={root}/empty_dir"], {}, ["data.path", "empty_dir"]),
    ("latents_not_extracted", ["data.kind=latents", "data.path={root}/empty_dir", "data.image_size=256"], {},
     ["index.json", "extract_latents"]),
    ("data_channels", ["student.in_channels=3", "distill.mode=none"], {}, ["channels", "student.in_channels"]),
    ("config_missing", ["--config", "{root}/nope.yaml"], {}, ["nope.yaml", "does not exist"]),
    ("config_not_yaml", ["--config", "{root}/broken.yaml"], {}, ["broken.yaml", "not valid YAML"]),
    ("config_a_list", ["--config", "{root}/list.yaml"], {}, ["list.yaml", "mapping"]),
    ("override_without_value", ["train.steps"], {}, ["dotted.key=value"]),
    ("precision_fp16", ["train.precision=fp16"], {}, ["train.precision", "'bf16'"]),
    ("model_name", ["student.name=DiT-Q/9"], {}, ["unknown model 'DiT-Q/9'", "DiT-S/2"]),
    ("patch_not_dividing", ["student.patch_size=5"], {}, ["patch_size 5"]),
    ("num_workers_negative", ["data.num_workers=-1"], {}, ["data.num_workers"]),
    ("layer_map_length", ["distill.mode=kd_shd", "distill.layer_map=[0]"], {}, ["layer mapping", "2 layers"]),
    ("layer_map_range", ["distill.mode=kd_shd", "distill.layer_map=[0,9]"], {}, ["9 is not a teacher layer"]),
    ("groups_uncovered", ["distill.mode=kd_shd", "distill.groups=[[0,1],[2]]"], {}, ["teacher heads [3]"]),
    ("groups_overlap", ["distill.mode=kd_shd", "distill.groups=[[0,1],[1,3]]"], {}, ["disjoint"]),
    ("groups_with_hard", ["distill.mode=kd_shd", "distill.squeeze=hard", "distill.groups=[[0,1],[2,3]]"], {},
     ["distill.groups", "distill.squeeze=hard"]),
    ("data_classes", ["student.num_classes=5", "distill.mode=none"], {}, ["10 classes", "student.num_classes=5"]),
    ("image_folder_is_a_file", ["data.kind=image_folder", "data.path={root}/list.yaml"], {}, ["list.yaml", "not a folder"]),
    ("resume_a_folder", ["--resume", "{root}"], {}, ["no such checkpoint file"]),
    ("fsdp_version_1", [], {"ACCELERATE_USE_FSDP": "true"}, ["FSDP version 1", "--fsdp_version 2"]),
    ("fsdp_compile", ["train.compile=true"], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
     ["train.compile=true with FSDP", "train.compile=false"]),
    ("fsdp_offload", [], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
     ["--fsdp_offload_params false"]),
    ("deepspeed", [], {"ACCELERATE_USE_DEEPSPEED": "true"}, ["DeepSpeed"]),
    ("launch_fp16", [], {"ACCELERATE_MIXED_PRECISION": "fp16"}, ["--mixed_precision fp16", "train.precision"]),
    ("launch_dynamo", [], {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, ["--dynamo_backend inductor", "train.compile"]),
    ("launch_bf16_vs_fp32", [], {"ACCELERATE_MIXED_PRECISION": "bf16"}, ["conflicts", "train.precision=bf16"]),
]
if importlib.util.find_spec("wandb") is None:
    CASES.append(("wandb_missing", ["train.log_with=wandb"], {}, ["pip install wandb"]))


@pytest.mark.parametrize("extra, env, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, monkeypatch, extra, env, needles):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    extra = [e.format(root=files["root"], teacher=files["teacher"]) for e in extra]
    before = snapshot(files["root"])
    outcome = call(train_script.main, _argv(files, *extra))
    assert_refused(outcome, *needles, code=2)
    assert "reinstall" not in outcome.stderr  # only true when the installed package is broken
    assert snapshot(files["root"]) == before


def test_launcher_precision_that_agrees_is_accepted(monkeypatch):
    # "no" is also what `accelerate launch` passes when nothing was chosen: train.precision decides.
    from shd_diffusion.config import load_config
    from shd_diffusion.train_config import ExperimentConfig
    from shd_diffusion.training import check_launch

    for precision, launched in (("bf16", "no"), ("bf16", "bf16"), ("fp32", "no")):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        check_launch(load_config(ExperimentConfig, None, [f"train.precision={precision}"]))


def test_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous_one(files, monkeypatch):
    run_dir = files["root"] / "runs" / "disk"
    argv = _argv(files, "distill.mode=none", "train.checkpoint_every=1", "train.run_name=disk")
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if "step_00000002" in str(getattr(f, "name", "")):
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    outcome = call(train_script.main, argv)
    assert_refused(outcome, "no space left", "step_00000002.pt", code=2)
    assert "inline_container" not in outcome.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000001.pt"], names  # the previous checkpoint is kept, no temp file left
    assert torch.load(run_dir / "checkpoints" / "step_00000001.pt", weights_only=True)["step"] == 1


def test_out_of_gpu_memory_in_a_step_is_one_line_with_the_fixes(files, monkeypatch):
    # The memory estimate is a lower bound: a batch it lets through can still run out on a GPU.
    from shd_diffusion.training import Trainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "compute_terms", out_of_memory)
    outcome = call(train_script.main, _argv(files, "distill.mode=none", "train.run_name=oom"))
    assert_refused(outcome, "out of GPU memory at step 1 with a micro-batch of 4 images", "train.grad_accum",
                   "train.grad_checkpointing=true", code=2)


@pytest.mark.slow
def test_debug_shows_the_traceback_and_the_plain_run_does_not(files):
    args = [sys.executable, str(REPO / "scripts" / "train_mdt_shd.py"), "--dry-run", "student.num_heads=0"]
    plain = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert "student.num_heads" in plain.stderr and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        from shd_diffusion.data import DatasetError

        raise DatasetError(f"cannot read image /data/cat_{i}.png: truncated. Delete or replace the file")


def test_a_data_loader_worker_error_keeps_its_message_not_the_worker_traceback():
    from shd_diffusion.data import DatasetError
    from shd_diffusion.training import worker_message

    loader = torch.utils.data.DataLoader(_Unreadable(), num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch re-raises in the main process
    assert worker_message(info.value) == "cannot read image /data/cat_0.png: truncated. Delete or replace the file"
    assert worker_message(DatasetError("plain message")) == "plain message"


def test_t2i_student_whose_width_is_not_heads_times_head_dim_is_one_line(tmp_path, fresh_accelerate):
    """A text-to-image student config whose width does not split into its heads surfaces in
    student_from_teacher (models/diffusers_t2i.py) when the trainer builds it: one line, nothing written."""
    from t2i_builders import SEQ, SIZE, TEXT_DIM, build_pipeline

    from shd_diffusion.latents import write_synthetic_text_latents

    pixart = build_pipeline(tmp_path, "pixart")  # 2 heads x head dim 8
    write_synthetic_text_latents(tmp_path / "lat", num_images=2, latent_shape=(4, SIZE // 2, SIZE // 2), seq_len=SEQ,
                                 dim=TEXT_DIM, pooled_dim=None, with_mask=True, shard_size=2)  # recorded as 64 px (x8)
    argv = ["student.name=from_teacher",
            "student.teacher_overrides={num_attention_heads: 3, cross_attention_dim: 16}",
            f"teacher.checkpoint={pixart / 'transformer'}", "distill.mode=kd_shd", "data.kind=text_latents",
            f"data.path={tmp_path / 'lat'}", "data.image_size=64", "data.num_workers=0", "train.precision=fp32",
            "train.global_batch_size=2", "train.log_with=none", f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=w", "--no-progress"]
    before = snapshot(tmp_path)
    outcome = call(train_script.main, argv)
    assert_refused(outcome, "student cross_attention_dim 16 != num_attention_heads 3 x attention_head_dim 8 = 24")
    assert len([ln for ln in outcome.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert snapshot(tmp_path) == before
