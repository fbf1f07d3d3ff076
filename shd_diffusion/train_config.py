"""The experiment schema of ``scripts/train_mdt_shd.py``: one dataclass per config section.

Every field has a default and a comment; YAML files under ``configs/`` set what differs. Fields
marked *shape* define tensor shapes; they and the other fields a checkpoint depends on (objective,
head groups, data stream, optimizer) are listed in :data:`RESUME_FIXED_FIELDS`: a resumed run
refuses to start when one of them changed. The others may change on a resume, with a record
(:data:`RESUME_CHANGEABLE_FIELDS`), or are paths checked by content (:data:`RESUME_CONTENT_FIELDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FROM_TEACHER",
    "ModelConfig",
    "TeacherConfig",
    "DistillConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ExperimentConfig",
    "RESUME_FIXED_FIELDS",
    "RESUME_CHANGEABLE_FIELDS",
    "RESUME_CONTENT_FIELDS",
    "MODES",
]

# What each distillation mode switches on (the weights below scale the terms that are on).
MODES: dict[str, tuple[bool, bool, str | None]] = {
    # mode:          (KD,    SHD,   feature distillation)
    "none": (False, False, None),  # plain diffusion training of the student, no teacher
    "kd": (True, False, None),  # paper's "simple KD" baseline: match the teacher's output
    "kd_shd": (True, True, None),  # KD + Squeezing-Heads Distillation (the method)
    "shd": (False, True, None),  # SHD only
    "kd_feat": (True, False, "projector"),  # KD + feature distillation with a learned projector
    "kd_selfcorr": (True, False, "self_correlation"),  # KD + self-correlation features (eq. 12)
}


FROM_TEACHER = "from_teacher"  # student.name of a text-to-image student: the teacher's diffusers class, reshaped


@dataclass
class ModelConfig:
    name: str = "MDTv2-S/2"  # registry name (shd_diffusion.models.MODEL_NAMES), or "from_teacher" (text-to-image)  [shape]
    input_size: int | None = None  # latent/pixel grid side; None = registry default (32)  [shape]
    patch_size: int | None = None  # patch side override; None = the name's /p  [shape]
    in_channels: int | None = None  # image channels (4 = SD-VAE latents, 1 = demo)  [shape]
    num_classes: int | None = None  # None = registry default (1000)  [shape]
    hidden_size: int | None = None  # width override (tiny/demo models)  [shape]
    depth: int | None = None  # depth override  [shape]
    num_heads: int | None = None  # head-count override  [shape]
    decode_layer: int | None = None  # MDTv2 decoder blocks (upstream S/2 trains with 6)  [shape]
    mask_ratio: float | None = None  # MDTv2 base mask ratio (+ U(0, 0.2) per batch)
    class_dropout_prob: float | None = None  # label dropout for CFG; None = 0.1
    learn_sigma: bool = True  # predict the variance interpolation too (hybrid loss)  [shape]
    # Text-to-image students (name: from_teacher): the teacher's diffusers config with these fields changed
    # (shd_diffusion.models.diffusers_t2i.student_from_teacher: num_layers, num_attention_heads, ...).
    teacher_overrides: dict[str, Any] | None = None  # student config fields; null = the teacher's shape  [shape]
    init_from_teacher: Literal["uniform"] | None = None  # copy evenly spaced teacher blocks (same width); null = random

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "num_classes", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null (the registry default), got {value}")
        if self.decode_layer is not None and self.decode_layer < 0:
            raise ValueError(f"decode_layer must be >= 0 or null, got {self.decode_layer}")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                             "each head gets hidden_size / num_heads channels")
        for name in ("mask_ratio", "class_dropout_prob"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) or null, got {value}")
        if self.name != FROM_TEACHER and (self.teacher_overrides is not None or self.init_from_teacher is not None):
            raise ValueError(f"teacher_overrides / init_from_teacher shape a text-to-image student: set name: "
                             f"{FROM_TEACHER} (or drop them for the registry model {self.name})")

    @property
    def from_teacher(self) -> bool:
        """A text-to-image student: the teacher's diffusers class, built by ``student_from_teacher``."""
        return self.name == FROM_TEACHER

    def overrides(self) -> dict[str, object]:
        """Keyword overrides for ``create_model`` (the fields that were set)."""
        keys = ("input_size", "patch_size", "in_channels", "num_classes", "hidden_size", "depth", "num_heads",
                "decode_layer", "mask_ratio", "class_dropout_prob")
        out: dict[str, object] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["learn_sigma"] = self.learn_sigma
        return out


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="MDTv2-B/2"))  # teacher architecture
    checkpoint: str | None = None  # official .pt, this package's checkpoint, a save_pretrained / diffusers folder or Hub id org/repo[:subfolder]
    use_ema: bool = True  # take the `ema` entry of wrapped checkpoints
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype of a text-to-image teacher (read directly in it)

    def __post_init__(self) -> None:
        if self.model.from_teacher:
            raise ValueError("teacher.model.name: from_teacher names a student built from the teacher; a text-to-image "
                             "teacher's architecture comes from teacher.checkpoint (leave teacher.model at its default)")


@dataclass
class DistillConfig:
    mode: Literal["none", "kd", "kd_shd", "shd", "kd_feat", "kd_selfcorr"] = "kd_shd"  # see MODES
    kd_weight: float = 1.0  # lambda_kd on the output-matching KD term
    shd_beta: float = 2.0  # beta on L_SHD (paper: 2.0 for image generation)
    temperature: float = 1.0  # attention temperature T_a >= 1 for the distilled maps
    loss: Literal["kl", "mse"] = "kl"  # map loss: row-wise KL(teacher || student) or MSE
    reduction: Literal["sum", "mean"] = "sum"  # over layers x heads: sum (paper eq. 11) or mean
    squeeze: Literal["lstsq", "constant", "hard", "matching", "progressive"] = "lstsq"  # alpha rule
    groups: list[list[int]] | None = None  # explicit teacher-head groups, one per student head
    layer_map: list[int] | None = None  # teacher layer (0-indexed) per student layer; None = round(j L_t / L_s)
    student_layers: list[int] | None = None  # student layers that get SHD (0-indexed); None = all
    feature_weight: float = 1.0  # weight of the feature-distillation term (kd_feat / kd_selfcorr)
    seed: int = 0  # seed of the hard-selection ablation's head subset
    calibration_batches: int = 1  # global batches (start of the data stream) used once for head matching
    max_group_size: int | None = None  # head matching: cap on teacher heads per student head; None = no cap
    chunk_size: int | None = None  # SHD query rows per block (memory ~ B H chunk N); None = automatic (256 MiB per block)
    shd_keys: Literal["all", "image"] = "all"  # text-to-image joint attention: image-query rows over all keys, or the image-image block
    cross_attention: bool = False  # also distil cross-attention maps (image queries over caption keys; PixArt's attn2), block to block

    def __post_init__(self) -> None:
        if self.temperature < 1.0:
            raise ValueError(f"distill.temperature must be >= 1 (T_a softens maps), got {self.temperature}")
        if self.calibration_batches < 1:
            raise ValueError(f"distill.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.max_group_size is not None and self.max_group_size < 1:
            raise ValueError(f"distill.max_group_size must be >= 1 or null, got {self.max_group_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"distill.chunk_size must be >= 1 (query rows per SHD block) or null (automatic), "
                             f"got {self.chunk_size}")
        if self.groups is not None and self.squeeze not in ("lstsq", "constant"):
            raise ValueError(
                f"distill.groups is set, but distill.squeeze={self.squeeze} chooses its own groups: "
                "explicit groups work with squeeze lstsq or constant (drop one of the two)"
            )
        if self.cross_attention and not self.uses_shd:
            raise ValueError(f"distill.cross_attention=true adds SHD layer pairs, but distill.mode={self.mode} has no SHD "
                             "term: use kd_shd or shd, or set distill.cross_attention=false")
        if self.cross_attention and self.shd_keys == "image":
            raise ValueError("distill.cross_attention=true distils maps over caption keys, which distill.shd_keys=image "
                             "(the image-image block of joint attention) would cut away: use distill.shd_keys=all")
        for name in ("kd_weight", "shd_beta", "feature_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def uses_teacher(self) -> bool:
        return self.mode != "none"

    @property
    def uses_kd(self) -> bool:
        return MODES[self.mode][0]

    @property
    def uses_shd(self) -> bool:
        return MODES[self.mode][1]

    @property
    def feature_kind(self) -> str | None:
        return MODES[self.mode][2]


@dataclass
class DataConfig:
    kind: Literal["animal_mnist", "image_folder", "latents", "text_latents"] = "latents"  # dataset type (text_latents: latents + text-encoder outputs)
    path: str | None = None  # folder of images or latent shards (animal_mnist: None = installed package)
    image_size: int = 256  # pixel size of images (image_folder); latents are image_size / 8
    vae: str = "stabilityai/sd-vae-ft-ema"  # AutoencoderKL hub id or local path (image_folder only)
    num_workers: int = 4  # DataLoader workers per process

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            hint = "null for the installed animal_mnist package" if self.kind == "animal_mnist" else "the data folder"
            raise ValueError(f"data.path is empty: set it to {hint}")
        if self.image_size < 1 or self.num_workers < 0:
            raise ValueError(f"data.image_size must be >= 1 and data.num_workers >= 0, "
                             f"got {self.image_size} and {self.num_workers}")


@dataclass
class OptimConfig:
    name: Literal["adan", "adan_pytorch", "adamw"] = "adan"  # adan = timm's Adan (see shd_diffusion.optim)
    lr: float = 5e-4  # upstream MDTv2-S/2 at global batch 256
    betas: list[float] | None = None  # None = (0.98, 0.92, 0.99) for Adan (official convention, not 1 - beta), (0.9, 0.999) for AdamW
    weight_decay: float = 0.0  # decoupled weight decay
    eps: float = 1e-8  # Adan epsilon
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    warmup_steps: int = 0  # linear lr warmup

    def __post_init__(self) -> None:
        from .optim import check_hyperparameters  # the optimizer's own rule, checked before any work

        check_hyperparameters(self.name, self.lr, self.betas, self.weight_decay, self.eps)
        if self.max_grad_norm < 0:
            raise ValueError(f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    run_name: str | None = None  # run folder name; None = the config file's stem (+ overrides hash)
    output_dir: str = "runs"  # parent of run folders
    steps: int = 400_000  # optimizer steps
    global_batch_size: int = 256  # images per optimizer step over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast dtype of the forward passes
    seed: int = 0  # global seed: init, data order, noise, masks
    ema_decay: float = 0.9999  # EMA of student weights (used for sampling)
    loss_weighting: Literal["auto", "uniform", "min_snr5"] = "auto"  # eps-MSE weights; auto = the family's default (MDTv2: min-SNR-5)
    checkpoint_every: int = 10_000  # steps between checkpoints (also on SIGTERM/SIGUSR1)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 100  # steps between scalar logs
    sample_every: int = 0  # steps between EMA sample grids (0 = never)
    figure_every: int = 0  # steps between alpha histograms + attention panels (text-to-image: + the validation grid) in the tracker (0 = never)
    validation_prompts: list[str] | str | None = None  # text-to-image previews: prompts, or a .txt / .json / .jsonl file of them (needed by sample_every / figure_every)
    validation_pipeline: str | None = None  # pipeline (folder or Hub id) whose text encoders, VAE, scheduler render previews; None = the one holding teacher.checkpoint
    validation_steps: int = 8  # the pipeline's num_inference_steps for a preview
    validation_guidance_scale: float | None = None  # the pipeline's guidance_scale for previews (None = its default)
    log_with: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # tracker (accelerate's) for scalars/figures
    healthy_factor: float = 10.0  # a checkpoint is healthy when nearby losses/grad norms are <= this x their median
    grad_checkpointing: bool = False  # recompute activations in backward (saves memory)
    compile: bool = False  # torch.compile the student
    tf32: bool = True  # TF32 tensor cores for float32 matmuls on CUDA (SHD's squeeze runs in float32)

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("sample_every", "figure_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.validation_prompts is not None:
            from .prompt_lists import resolve_prompts

            resolve_prompts(self.validation_prompts)  # an empty list, a blank prompt or a missing file: refused now
        if self.validation_steps < 1:
            raise ValueError(f"train.validation_steps must be >= 1, got {self.validation_steps}")
        if self.validation_pipeline is not None and not self.validation_pipeline.strip():
            raise ValueError("train.validation_pipeline is empty: give the teacher's pipeline folder or Hub id, or null")
        if self.healthy_factor <= 1.0:
            raise ValueError(f"train.healthy_factor must be > 1, got {self.healthy_factor}")
        if not self.output_dir.strip() or (self.run_name is not None and not self.run_name.strip()):
            raise ValueError("train.output_dir and train.run_name must not be empty")


@dataclass
class ExperimentConfig:
    student: ModelConfig = field(default_factory=ModelConfig)  # the model being trained
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # frozen teacher
    distill: DistillConfig = field(default_factory=DistillConfig)  # what is distilled, how
    data: DataConfig = field(default_factory=DataConfig)  # training images / latents
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer + schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # loop, checkpoints, logging


# What a resume does with each config field (tests/test_training.py checks that every field is in
# exactly one list). The principle: a run folder's config.yaml plus its history.jsonl must describe
# how every step of the run was trained, so what defines the weights, the objective or the data
# stream is fixed, and what only says how, how long or where it runs may change with a record.
_MODEL_FIELDS = ("name", "input_size", "patch_size", "in_channels", "num_classes", "hidden_size", "depth",
                 "num_heads", "decode_layer", "mask_ratio", "class_dropout_prob", "learn_sigma", "teacher_overrides",
                 "init_from_teacher")
RESUME_FIXED_FIELDS: list[str] = [
    # Shapes, and the student's objective (MDT mask ratio, label dropout): the weights' meaning.
    *(f"student.{k}" for k in _MODEL_FIELDS),
    *(f"teacher.model.{k}" for k in _MODEL_FIELDS),
    "teacher.use_ema", "teacher.dtype",  # which of the teacher file's weights are the teacher, at which precision
    # The objective: a run trained on two losses is described by neither config (the issue's
    # shd_beta / temperature case); the head groups and layer pairs are saved with the weights.
    "distill.mode", "distill.kd_weight", "distill.shd_beta", "distill.temperature", "distill.loss",
    "distill.reduction", "distill.squeeze", "distill.groups", "distill.layer_map", "distill.student_layers",
    "distill.feature_weight", "distill.seed", "distill.calibration_batches", "distill.max_group_size", "distill.shd_keys",
    "distill.cross_attention",
    # The data stream: step s consumes stream positions [s G, (s + 1) G) of (seed, data, G).
    "data.kind", "data.image_size", "data.vae", "train.global_batch_size", "train.seed",
    # The EMA and the loss weights are part of what is trained; Adan's / AdamW's betas and eps
    # come back from the optimizer state on load, so a changed value would be silently ignored.
    "train.ema_decay", "train.loss_weighting", "optim.name", "optim.betas", "optim.eps",
]
"""Refused on resume when changed, naming the field (start a new run, or revert)."""

RESUME_CHANGEABLE_FIELDS: list[str] = [
    # Length: train.steps may rise to extend a run (below the steps already done is refused).
    "train.steps",
    # The lr schedule and clipping: lowering them is the fix after a divergence; they take effect.
    "optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.max_grad_norm",
    # How a step is computed, not what: the split of the same global batch (like the process
    # count, a requeue onto other GPUs), precision, compilation, recomputation, SHD's row blocks.
    "train.grad_accum", "train.precision", "train.tf32", "train.compile", "train.grad_checkpointing",
    "distill.chunk_size", "data.num_workers",
    # Bookkeeping: cadence of checkpoints, logs, previews and figures; the health judgement; where.
    "train.checkpoint_every", "train.keep_last", "train.log_every", "train.sample_every", "train.figure_every",
    "train.validation_prompts", "train.validation_pipeline", "train.validation_steps", "train.validation_guidance_scale",
    "train.log_with", "train.healthy_factor", "train.output_dir", "train.run_name",
]
"""Accepted on resume when changed: each change is said in one line and appended to history.jsonl."""

RESUME_CONTENT_FIELDS: list[str] = ["teacher.checkpoint", "data.path"]
"""Paths that may move: what is checked is their content (the teacher's sha256, the data's
fingerprint, stored in every checkpoint); a new path with the same content is recorded."""
