"""diffusers text-to-image transformers (PixArt, SD3, FLUX.1, Qwen-Image) as teachers and students.

Teachers: tiny random models of each class are saved (safetensors) as a model folder, a pipeline
folder and a fake Hugging Face cache (``models--org--name/snapshots/<rev>/transformer`` and
``refs/main``, offline), and loaded through the one loader; outputs equal the saved model's
bitwise (the same weights on the same CPU kernels). Students: shapes, refusals, and the uniform
block copy (bitwise). Real sizes: each configs/t2i YAML's student built on the meta device from
the teacher's published config.json (written below by hand).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hub_cache import offline_hub_cache
import torch
import yaml
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel

from shd_diffusion.models import WeightsError, load_model, load_weights
from shd_diffusion.models.diffusers_t2i import (
    copy_teacher_blocks,
    parameter_count,
    student_config,
    student_from_teacher,
    uniform_block_indices,
)

REPO = Path(__file__).resolve().parents[1]
REV = "89abcdef0123456789abcdef0123456789abcdef"
pytestmark = pytest.mark.usefixtures("single_thread")

# Tiny configs: width 32 (2 heads x 16), 4 blocks (FLUX: 2 double + 4 single), text width 12.
TINY = {
    "PixArtTransformer2DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=4, cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=12),
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=32,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                                   guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "QwenImageTransformer2DModel": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6)),
}
CLASSES = {c.__name__: c for c in (PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel,
                                   QwenImageTransformer2DModel)}
NAMES = list(TINY)


def random_model(name: str, seed: int = 0, **overrides):
    """A tiny model with every weight random (diffusers zero-inits several output layers)."""
    torch.manual_seed(seed)
    model = CLASSES[name](**{**TINY[name], **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def config_of(model) -> dict:
    """What the model's config.json holds (an in-memory config has no ``_class_name``)."""
    return {"_class_name": type(model).__name__, **model.config}


def forward(model, batch: int = 2) -> torch.Tensor:
    """The model's output on fixed inputs: an 8 x 8 latent grid (16 tokens after patching), 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    name, text = type(model).__name__, torch.randn(batch, 5, 12, generator=g)
    t = torch.tensor([0.25, 0.75])[:batch]
    with torch.no_grad():
        if name == "PixArtTransformer2DModel":
            x = torch.randn(batch, 4, 8, 8, generator=g)
            return model(x, encoder_hidden_states=text, timestep=t * 1000,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        if name == "SD3Transformer2DModel":
            x = torch.randn(batch, 4, 8, 8, generator=g)
            return model(x, encoder_hidden_states=text, pooled_projections=torch.randn(batch, 10, generator=g),
                         timestep=t * 1000).sample
        if name == "FluxTransformer2DModel":
            x = torch.randn(batch, 16, 8, generator=g)  # (B, S, C) packed tokens of a 4 x 4 grid
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
            return model(x, encoder_hidden_states=text, pooled_projections=torch.randn(batch, 10, generator=g),
                         timestep=t, img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(5, 3),
                         guidance=torch.full((batch,), 3.5)).sample
        x = torch.randn(batch, 16, 16, generator=g)  # (B, S, 4 * 2 * 2) packed 2 x 2 patches of a 4 x 4 grid
        return model(x, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(batch, 5), timestep=t,
                     img_shapes=[[(1, 4, 4)]] * batch).sample


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache in tmp; returns a function that adds a repo snapshot
    holding a folder's files under ``transformer/``."""
    add = offline_hub_cache(tmp_path, monkeypatch)
    return lambda repo_id, folder: add(repo_id, folder, REV, under="transformer")


def _pipeline(tmp_path: Path, model_dir: Path, name: str) -> Path:
    """A pipeline-like folder: model_index.json and the model in transformer/."""
    pipe = tmp_path / "pipe"
    shutil.copytree(model_dir, pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline", "transformer": ["diffusers", name]}))
    return pipe


# ------------------------------------------------------------------------------------------ teachers


@pytest.mark.parametrize("name", NAMES)
def test_teachers_load_bitwise_from_a_folder_a_pipeline_and_the_hub_cache(name, tmp_path, hub_cache):
    ref_model = random_model(name)
    sharded = name == "FluxTransformer2DModel"  # as FLUX.1-dev's folder: an index and several files
    ref_model.save_pretrained(tmp_path / "model", max_shard_size="40KB" if sharded else "10GB")
    shards = list((tmp_path / "model").glob("*.safetensors"))
    assert len(shards) > 1 if sharded else [p.name for p in shards] == ["diffusion_pytorch_model.safetensors"]
    pipe = _pipeline(tmp_path, tmp_path / "model", name)
    hub_cache("org/tiny-t2i", tmp_path / "model")
    ref = forward(ref_model)
    assert ref.abs().max() > 0.1 and torch.isfinite(ref).all()  # a real output, not diffusers' zero init
    for source in (tmp_path / "model", pipe, f"{pipe}:transformer", "org/tiny-t2i:transformer", f"org/tiny-t2i@{REV}:transformer"):
        model = load_model(source)
        assert type(model) is CLASSES[name] and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert torch.equal(forward(model), ref), source


def test_dtype_and_legacy_class_name(tmp_path):
    """``dtype`` loads the parameters in it; a PixArt folder naming the legacy ``Transformer2DModel``
    (as published PixArt repos do) loads as PixArtTransformer2DModel, as diffusers maps it."""
    ref_model = random_model("PixArtTransformer2DModel")
    ref_model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    model = load_model(tmp_path / "model", dtype=torch.bfloat16)
    assert type(model) is PixArtTransformer2DModel
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(forward(model.float()), forward(ref_model.to(torch.bfloat16).float()))


def test_a_legacy_dit_folder_still_converts_to_dit(tmp_path):
    """The same mapping sends ``Transformer2DModel`` + ``ada_norm_zero`` (as facebook/DiT-XL-2-256
    names it) to the DiT conversion, not to a refusal."""
    from test_sources import random_diffusers_dit

    random_diffusers_dit().save_pretrained(tmp_path / "dit")
    reference = load_model(tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    (tmp_path / "dit" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    legacy = load_model(tmp_path / "dit")
    assert type(legacy).__name__ == "DiT"
    for key, value in reference.state_dict().items():
        assert torch.equal(legacy.state_dict()[key], value), key


def test_load_weights_adopts_a_teacher_of_the_built_config(tmp_path):
    ref_model = random_model("SD3Transformer2DModel")
    ref_model.save_pretrained(tmp_path / "model")
    built = CLASSES["SD3Transformer2DModel"](**TINY["SD3Transformer2DModel"])  # what training builds from its config
    assert torch.equal(forward(load_weights(built, tmp_path / "model").eval()), forward(ref_model))
    other = CLASSES["SD3Transformer2DModel"](**{**TINY["SD3Transformer2DModel"], "num_layers": 3, "dual_attention_layers": (0,)})
    with pytest.raises(WeightsError, match=r"differs in dual_attention_layers=\[0, 1\] \(model: \[0\]\), num_layers=4 \(model: 3\)"):
        load_weights(other, tmp_path / "model")


def _bad_source(case: str, tmp_path: Path, hub_cache) -> str | Path:
    """A source for each refusal of the loader."""
    model_dir = tmp_path / "model"
    if case == "sana":
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
        (model_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        return model_dir
    if case == "other_class":
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
        return model_dir
    random_model("FluxTransformer2DModel").save_pretrained(model_dir, safe_serialization=case != "pickle_weights")
    if case == "pickle_weights":
        return model_dir
    if case == "local_subfolder":
        return f"{_pipeline(tmp_path, model_dir, 'FluxTransformer2DModel')}:transformr"
    if case == "hub_subfolder":
        hub_cache("org/tiny-flux", model_dir)
        return "org/tiny-flux:transformr"
    return "org/not-cached:transformer"


@pytest.mark.parametrize("case, needles", [
    ("sana", ["SanaTransformer2DModel", "linear", "SHD needs softmax maps", "supported: PixArtTransformer2DModel, "
              "SD3Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel"]),
    ("other_class", ["Flux2Transformer2DModel", "not a DiT / MDTv2 model or a supported text-to-image transformer",
                     "FluxTransformer2DModel, QwenImageTransformer2DModel"]),
    ("pickle_weights", ["diffusion_pytorch_model.bin", "only pickle weights", "never unpickles", "safetensors"]),
    ("local_subfolder", ["has no subfolder 'transformr'", "(it has: transformer)"]),
    ("hub_subfolder", ["org/tiny-flux has no folder 'transformr'", "(it has: transformer)"]),
    ("hub_not_cached", ["org/not-cached", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1",
                        "hf download org/not-cached --include 'transformer/*'"]),
])
def test_bad_teacher_sources_fail_with_one_clear_line(case, needles, tmp_path, hub_cache):
    source = _bad_source(case, tmp_path, hub_cache)
    with pytest.raises(WeightsError) as info:
        load_model(source)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


# ------------------------------------------------------------------------------------------ students

# Each class with half the blocks (FLUX: 2 double + 4 single -> 1 + 2).
SMALLER = {"PixArtTransformer2DModel": dict(num_layers=2), "SD3Transformer2DModel": dict(num_layers=2),
           "FluxTransformer2DModel": dict(num_layers=1, num_single_layers=2), "QwenImageTransformer2DModel": dict(num_layers=2)}


@pytest.mark.parametrize("name", NAMES)
def test_students_keep_the_token_grid_and_outputs_with_fewer_blocks_and_heads(name):
    teacher = random_model(name)
    student = student_from_teacher(config_of(teacher), seed=3, num_attention_heads=1, **SMALLER[name])
    assert type(student) is type(teacher)
    cfg = student.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (1, 16)
    for attr, n in (("transformer_blocks", 2), ("single_transformer_blocks", 2)):
        if hasattr(student, attr):
            assert len(getattr(student, attr)) == (1 if (name, attr) == ("FluxTransformer2DModel", "transformer_blocks") else n)
    width_field = {"PixArtTransformer2DModel": "cross_attention_dim", "SD3Transformer2DModel": "caption_projection_dim"}
    if name in width_field:
        assert cfg[width_field[name]] == 16  # follows heads x head_dim
    if name == "SD3Transformer2DModel":
        assert list(cfg.dual_attention_layers) == [0]  # teacher blocks (0, 3) picked; only 0 is dual
    assert forward(student).shape == forward(teacher).shape
    again = student_from_teacher(config_of(teacher), seed=3, num_attention_heads=1, **SMALLER[name])
    assert torch.equal(forward(again), forward(student))  # the seed fixes the random init


@pytest.mark.parametrize("name", NAMES)
def test_uniform_init_copies_the_picked_teacher_blocks_bitwise(name):
    teacher = random_model(name)
    student = student_from_teacher(teacher, init_from_teacher="uniform", **SMALLER[name])
    t_state, s_state = teacher.state_dict(), student.state_dict()
    picks = {"transformer_blocks": [0, 3], "single_transformer_blocks": [0, 3]}  # uniform 4 -> 2
    if name == "FluxTransformer2DModel":
        picks["transformer_blocks"] = [1]  # one block: the teacher's last (of 2)
    copied = 0
    for key, value in s_state.items():
        attr, _, rest = key.partition(".")
        src = key
        if attr in picks:
            index, _, tail = rest.partition(".")
            src = f"{attr}.{picks[attr][int(index)]}.{tail}"
        assert torch.equal(value, t_state[src]), key
        copied += value.numel()
    assert copied == parameter_count(student) + sum(b.numel() for n, b in student.named_buffers() if n in s_state)
    assert not torch.equal(forward(student), forward(random_model(name, seed=5, **SMALLER[name])))


def test_uniform_block_indices():
    assert uniform_block_indices(28, 12) == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert uniform_block_indices(4, 2) == [0, 3] and uniform_block_indices(5, 3) == [0, 2, 4]
    assert uniform_block_indices(19, 1) == [18] and uniform_block_indices(6, 6) == list(range(6))
    with pytest.raises(WeightsError, match="cannot pick 7 of the teacher's 6 blocks"):
        uniform_block_indices(6, 7)


@pytest.mark.parametrize("name, overrides, needles", [
    ("PixArtTransformer2DModel", dict(patch_size=4), ["student patch_size 4 != teacher patch_size 2", "same token grid"]),
    ("SD3Transformer2DModel", dict(pos_embed_max_size=16), ["pos_embed_max_size 16", "same token grid"]),
    ("FluxTransformer2DModel", dict(in_channels=16), ["student in_channels 16 != teacher in_channels 8", "KD needs"]),
    ("QwenImageTransformer2DModel", dict(joint_attention_dim=8), ["joint_attention_dim 8", "same text embeddings"]),
    ("PixArtTransformer2DModel", dict(caption_channels=8), ["caption_channels 8", "same text embeddings"]),
    ("FluxTransformer2DModel", dict(guidance_embeds=False), ["guidance_embeds False", "conditioning inputs"]),
    ("SD3Transformer2DModel", dict(width=48), ["student width 48 != num_attention_heads 2 x attention_head_dim 16 = 32"]),
    ("SD3Transformer2DModel", dict(caption_projection_dim=48), ["student caption_projection_dim 48 != num_attention_heads 2"]),
    ("FluxTransformer2DModel", dict(attention_head_dim=32), ["axes_dims_rope [4, 6, 6] sums to 16, not attention_head_dim 32",
                                                              "(e.g. [8, 12, 12])"]),
    ("QwenImageTransformer2DModel", dict(num_layer=2), ["unknown QwenImageTransformer2DModel student field(s) num_layer"]),
    ("PixArtTransformer2DModel", dict(num_layers=0), ["student num_layers 0 must be at least 1"]),
    ("SD3Transformer2DModel", dict(num_layers=2, dual_attention_layers=(0, 2)),
     ["student dual_attention_layers [0, 2] must be block indices below num_layers 2"]),
])
def test_student_refusals_name_the_field(name, overrides, needles):
    with pytest.raises(WeightsError) as info:
        student_config(config_of(random_model(name)), **overrides)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    teacher_value = {**TINY[name], "width": 32}.get(next(iter(overrides)))
    if teacher_value is not None:  # the teacher's own value is accepted: the refusal is the change
        student_config(config_of(random_model(name)), **{next(iter(overrides)): teacher_value})


def test_uniform_init_refusals():
    teacher = random_model("FluxTransformer2DModel")
    with pytest.raises(WeightsError, match="pass the teacher model, not its config"):
        student_from_teacher(config_of(teacher), init_from_teacher="uniform", num_layers=1)
    with pytest.raises(WeightsError, match="needs the teacher's width: student 16 vs teacher 32"):
        student_from_teacher(teacher, init_from_teacher="uniform", num_attention_heads=1)
    with pytest.raises(WeightsError, match="'every_other' is not known"):
        student_from_teacher(teacher, init_from_teacher="every_other")
    # Same width, other head_dim: the QK-norm weights (one per head_dim entry) have no source.
    with pytest.raises(WeightsError, match=r"no teacher tensor of their shape, e\.g\. transformer_blocks\.0\.attn\.norm_q\.weight"):
        student_from_teacher(teacher, init_from_teacher="uniform", num_attention_heads=4, attention_head_dim=8,
                             axes_dims_rope=(2, 2, 4))
    sd3 = random_model("SD3Transformer2DModel")
    with pytest.raises(WeightsError, match="no teacher tensor of their shape"):  # block 1 dual, teacher block 3 is not
        copy_teacher_blocks(CLASSES["SD3Transformer2DModel"](**{**TINY["SD3Transformer2DModel"], "num_layers": 2}), sd3)


# --------------------------------------------------------------------------------------- real sizes

# The published transformer/config.json shape fields of each teacher (written from the model
# repos' configs; non-shape fields left at diffusers' defaults). PixArt-Σ's repo names the legacy
# Transformer2DModel class with norm_type ada_norm_single.
REAL_TEACHERS = {
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS:transformer": dict(
        _class_name="Transformer2DModel", norm_type="ada_norm_single", num_attention_heads=16, attention_head_dim=72,
        in_channels=4, out_channels=8, num_layers=28, cross_attention_dim=1152, sample_size=64, patch_size=2,
        caption_channels=4096, use_additional_conditions=False, num_embeds_ada_norm=1000, norm_elementwise_affine=False,
        norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate"),
    "stabilityai/stable-diffusion-3.5-medium:transformer": dict(
        _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, dual_attention_layers=list(range(13)),
        qk_norm="rms_norm"),
    "black-forest-labs/FLUX.1-dev:transformer": dict(
        _class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
}
# Parameter counts on the meta device (diffusers 0.42.1): (teacher, student).
REAL_COUNTS = {
    "pixart_sigma_student.yaml": (610_856_096, 270_767_264),  # 0.61 B -> 0.27 B
    "sd35_medium_student.yaml": (2_243_171_520, 494_686_016),  # 2.24 B -> 0.49 B
    "flux1_student.yaml": (11_901_408_320, 2_247_716_928),  # 11.9 B -> 2.25 B
}


@pytest.mark.parametrize("config_name", list(REAL_COUNTS))
def test_the_t2i_yaml_students_build_from_the_real_teacher_configs(config_name):
    fragment = yaml.safe_load((REPO / "configs" / "t2i" / config_name).read_text())
    teacher_config = REAL_TEACHERS[fragment["teacher"]["checkpoint"]]
    overrides = fragment["student"]["teacher_overrides"]
    config = student_config(teacher_config, **overrides)
    with torch.device("meta"):
        teacher = student_from_teacher(teacher_config)  # no overrides: the teacher's own architecture
        student = student_from_teacher(teacher_config, **overrides)
    counts = parameter_count(teacher), parameter_count(student)
    assert counts == REAL_COUNTS[config_name]
    assert type(student).__name__ == type(teacher).__name__ and dict(student.config) == {**dict(student.config), **config}
    if type(student).__name__ == "SD3Transformer2DModel":  # picked teacher blocks 0, 2, ..., 10 are dual, 13.. are not
        assert list(student.config.dual_attention_layers) == list(range(6))
    if fragment["student"].get("init_from_teacher") == "uniform":
        assert student.config.num_attention_heads * student.config.attention_head_dim == \
            teacher.config.num_attention_heads * teacher.config.attention_head_dim
