"""Prompts to images through the teacher's pipeline with the student inside, and CLIP score.

Tiny random models saved locally in the diffusers / transformers layouts (PixArt-Σ: a 1-layer T5
with a word-level tokenizer written here, a 2-level VAE, a 2-block transformer, DPM-Solver;
CLIP: 1-layer towers, a character tokenizer), everything offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_cache import offline_hub_cache
from t2i_builders import tiny_clip

from shd_diffusion import t2i_sampling as ts
from shd_diffusion.evaluation import clip_score as cs
from shd_diffusion.models.loading import WeightsError, weights_sha256
from shd_diffusion.sampler import image_seeds
from shd_diffusion.shards import ShardError, shard_path

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat", "a blue dog on the street", "a photo of a car"]
CALL = dict(use_resolution_binning=False, max_sequence_length=8)  # tiny sample_size has no resolution bins
STEPS, SCALE = 2, 4.5


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (diffusers zero-inits output layers, which would make images constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _word_tokenizer() -> tuple[dict[str, int], object]:
    """A word-level T5-style tokenizer built offline: (its vocabulary, the tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a photo of cat dog red blue car on the street".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return vocab, PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny PixArt-Σ pipeline folder, a student folder, and a training checkpoint of the student."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from shd_diffusion.models.diffusers_t2i import student_from_teacher

    root = tmp_path_factory.mktemp("t2i")
    vocab, tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=12, d_kv=4, d_ff=16, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    teacher = _randomise(PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=12, norm_type="ada_norm_single"), 1)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=teacher,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(root / "pixart")

    student = _randomise(student_from_teacher(teacher, num_layers=1, num_attention_heads=2, attention_head_dim=16), 2)
    student.save_pretrained(root / "student")
    overrides = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
    ema = {k: v.clone() for k, v in student.state_dict().items()}
    raw = {k: v + 0.01 for k, v in ema.items()}  # the raw weights differ from the EMA
    checkpoint = {  # the trainer's layout (training/trainer.py state_dict), without optimizer internals
        "step": 7, "model": raw, "ema": ema, "optimizer": {}, "scheduler": {}, "groups": [], "rng": {},
        "config": {"student": {"name": "from_teacher", "teacher_overrides": overrides},
                   "teacher": {"checkpoint": str(root / "pixart" / "transformer")}},
        "identity": {"teacher_sha256": weights_sha256(teacher.state_dict()), "data_fingerprint": None},
    }
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, root / "run" / "checkpoints" / "step_00000007.pt")
    return {"root": root, "pipe": root / "pixart", "student": root / "student",
            "ckpt": root / "run" / "checkpoints" / "step_00000007.pt", "run": root / "run",
            "student_sha": weights_sha256(student.state_dict())}


@pytest.fixture(scope="module")
def pipe(world: dict):
    """The teacher pipeline with the student folder as its transformer."""
    config = ts.teacher_transformer_config(world["pipe"])
    student, _ = ts.load_student(world["student"], config)
    return ts.load_pipeline(world["pipe"], student)


def _sampler(pipe, **kw) -> ts.PromptSampler:
    return ts.PromptSampler(pipe, **{"prompts": PROMPTS, "num_inference_steps": STEPS, "guidance_scale": SCALE,
                                     "pipeline_kwargs": CALL, **kw})


# ------------------------------------------------------------------------------------------ images


def test_images_equal_the_pipeline_called_directly_with_the_student(pipe, world):
    """Bitwise: our images are ``pipe(...).images`` (PIL) with one generator per image seeded by
    image_seeds, prompt i % P; the pipeline holds the student's weights, not the teacher's."""
    sampler = _sampler(pipe)
    images, labels = sampler.sample([1, 3])
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert labels.tolist() == [1, 0]
    seeds = image_seeds([1, 3], 0)
    direct = pipe([PROMPTS[1], PROMPTS[0]], generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                  num_inference_steps=STEPS, guidance_scale=SCALE, **CALL).images
    assert np.array_equal(images, np.stack([np.asarray(im) for im in direct]))
    assert weights_sha256(pipe.transformer.state_dict()) == world["student_sha"]
    assert len(pipe.transformer.transformer_blocks) == 1
    assert images.std() > 5  # random weights: not a constant image
    assert not np.array_equal(images[0], images[1])


def test_batch_size_does_not_change_the_images(pipe, tmp_path):
    """Batch 1 and batch 2 (one generator per image either way) give the same uint8 images."""
    outs = []
    for bs in (1, 2):
        ts.sample_prompts(_sampler(pipe), tmp_path / f"b{bs}", shard_size=2, batch_size=bs)
        with np.load(ts.assemble_prompts(tmp_path / f"b{bs}")) as z:
            outs.append(z["arr_0"])
    assert np.array_equal(outs[0], outs[1])


def test_sample_file_layout_and_fid_reader(pipe, tmp_path):
    """ADM layout + prompts in the file; scoring's reader streams arr_0 unchanged."""
    from shd_diffusion.evaluation.images import open_npz_images

    ts.sample_prompts(_sampler(pipe), tmp_path, num_samples=4, shard_size=3, batch_size=2)
    final = ts.assemble_prompts(tmp_path)
    assert final.name == "samples_4x16x16x3.npz"
    with np.load(final, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "arr_1", "prompts"]
        arr0, arr1, prompts = z["arr_0"], z["arr_1"], z["prompts"]
    assert arr1.tolist() == [0, 1, 2, 0] and prompts.tolist() == [*PROMPTS, PROMPTS[0]]
    streamed = np.concatenate(list(open_npz_images(final).batches(3)))
    assert np.array_equal(streamed, arr0)
    assert json.loads((tmp_path / "shards" / ts.PROMPTS_FILE).read_text()) == PROMPTS


def test_fid_of_a_t2i_sample_file_equals_that_of_its_images_alone(pipe, tmp_path, monkeypatch):
    """score() on the t2i npz (arr_1 + prompts) gives the report of an npz holding only its arr_0."""
    from PIL import Image

    from shd_diffusion.evaluation import scoring
    from shd_diffusion.evaluation.inception import WeightsInfo

    class Pixels(torch.nn.Module):  # a stand-in feature extractor: deterministic features of the pixels
        def forward(self, x):
            f = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # (B, 48)
            return (torch.cat([f, f.square() / 255], 1),)  # (B, 96)

    info = WeightsInfo("stand-in", "0" * 64, False, "stand-in has no logits")
    monkeypatch.setattr(scoring, "_feature_extractor", lambda w, d: (Pixels(), info, [scoring.POOL]))
    ts.sample_prompts(_sampler(pipe), tmp_path / "s", num_samples=5, shard_size=5, batch_size=5)
    t2i = ts.assemble_prompts(tmp_path / "s")
    with np.load(t2i) as z:
        images = z["arr_0"]
    plain = tmp_path / "plain.npz"
    np.savez(plain, arr_0=images)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(img).save(ref / f"{i}.png")
    kw = dict(device="cpu", cache_dir=tmp_path / "cache", kid_subsets=2, kid_subset_size=2, pr_k=1, is_splits=1,
              progress=False)
    a, b = scoring.score(t2i, ref, **kw), scoring.score(plain, ref, **kw)
    assert math.isfinite(a["fid"]) and a["fid"] > 0
    for key in ("fid", "precision", "recall", "kid_mean", "num_samples", "image_hw", "fid_protocol"):
        assert a[key] == b[key], key


# ------------------------------------------------------------------------------------------ resume


def test_resume_keeps_finished_shards_and_refuses_other_settings(pipe, world, tmp_path):
    out = tmp_path / "run"

    def crash(k: int) -> None:
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ts.sample_prompts(_sampler(pipe), out, num_samples=4, shard_size=2, batch_size=2, on_shard_done=crash)
    first = shard_path(out, 0)
    stamp = first.stat().st_mtime_ns
    assert not shard_path(out, 1).exists()
    assert ts.sample_prompts(_sampler(pipe), out, num_samples=4, shard_size=2, batch_size=2) == [1]
    assert first.stat().st_mtime_ns == stamp
    with np.load(ts.assemble_prompts(out)) as z:
        resumed = z["arr_0"]
    ts.sample_prompts(_sampler(pipe), tmp_path / "whole", num_samples=4, shard_size=2, batch_size=2)
    with np.load(ts.assemble_prompts(tmp_path / "whole")) as z:
        assert np.array_equal(z["arr_0"], resumed)

    same = dict(num_samples=4, shard_size=2, batch_size=2)
    changed = {"num_inference_steps": dict(sampler=dict(num_inference_steps=3)),
               "guidance_scale": dict(sampler=dict(guidance_scale=2.0)),
               "seed": dict(sampler=dict(seed=1)),
               "prompts_sha256": dict(sampler=dict(prompts=[*PROMPTS[:2], "a cat"])),
               "teacher": dict(run=dict(teacher="PixArt-alpha/PixArt-Sigma-XL-2-512-MS")),
               "batch_size": dict(run=dict(batch_size=1))}
    for field, how in changed.items():
        with pytest.raises(ShardError, match=field):
            ts.sample_prompts(_sampler(pipe, **how.get("sampler", {})), out, **{**same, **how.get("run", {})})

    # Other weights at the same path: refused by content; the same weights elsewhere: resumed.
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    try:
        with torch.no_grad():
            next(pipe.transformer.parameters()).add_(1e-3)
        with pytest.raises(ShardError, match="weights_sha256.*differ by content"):
            ts.sample_prompts(_sampler(pipe), out, checkpoint=str(world["student"]), **same)
    finally:
        pipe.transformer.load_state_dict(original)
    assert ts.sample_prompts(_sampler(pipe), out, **same) == []


# ------------------------------------------------------------------------------------------ students


def test_a_training_checkpoint_and_its_run_folder_load_the_ema_student(world, pipe):
    config = ts.teacher_transformer_config(world["pipe"])
    for source in (world["ckpt"], world["run"]):
        student, info = ts.load_student(source, config)
        assert weights_sha256(student.state_dict()) == world["student_sha"]  # EMA = the folder's weights
        assert info["step"] == 7 and info["weights"] == "its 'ema' weights"
    raw, _ = ts.load_student(world["ckpt"], config, use_ema=False)
    assert weights_sha256(raw.state_dict()) != world["student_sha"]
    # Through the pipeline: the checkpoint's student renders the folder student's images.
    from_ckpt = ts.load_pipeline(world["pipe"], student)
    a, _ = _sampler(from_ckpt).sample([0])
    b, _ = _sampler(pipe).sample([0])
    assert np.array_equal(a, b)


def test_bad_students_and_prompts_are_one_clear_line(world, tmp_path):
    config = ts.teacher_transformer_config(world["pipe"])
    raw = torch.load(world["ckpt"], weights_only=True)
    raw["config"]["student"] = {"name": "MDTv2-S/2"}
    torch.save(raw, tmp_path / "dit.pt")
    with pytest.raises(WeightsError, match="holds a MDTv2-S/2 student, not a text-to-image student"):
        ts.load_student(tmp_path / "dit.pt", config)
    with pytest.raises(WeightsError, match="does not fit the pipeline: student patch_size 2 != teacher patch_size 1: SHD needs the same token grid"):
        ts.load_student(world["student"], {**config, "patch_size": 1})
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ts.T2ISampleError, match="holds no prompts"):
        ts.read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.jsonl").write_text('{"file_name": "0.png", "text": "a cat"}\n"a dog"\n')
    assert ts.read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]


# ------------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_equals_a_hand_computation(clip_dir, tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    prompts = ["a cat", "a dog on the grass", "red", "blue car", "a very long prompt about many things at once"]
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(5), prompts=np.array(prompts))
    report = cs.clip_score(tmp_path / "s.npz", str(clip_dir), batch_size=2, device="cpu", progress=False)

    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    by_hand = []
    with torch.no_grad():
        for img, text in zip(images, prompts):
            pix = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
            ids = proc.tokenizer([text], return_tensors="pt", truncation=True, max_length=16)
            e_img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)[0].double()
            e_txt = model.text_projection(model.text_model(**ids).pooler_output)[0].double()
            by_hand.append(100 * max(float(e_img @ e_txt / (e_img.norm() * e_txt.norm())), 0.0))
    assert report["clip_score"] == pytest.approx(float(np.mean(by_hand)), rel=1e-6, abs=1e-6)
    assert any(s > 0 for s in by_hand)
    assert report["num_samples"] == 5 and report["num_truncated_prompts"] >= 1
    prov = report["provenance"]["clip_score"]
    assert prov["weights_sha256"] == report["clip"]["weights_sha256"] == weights_sha256(model.state_dict())
    assert "max(cos(image_embeds, text_embeds), 0)" in prov["protocol"]
    # Prompts given explicitly override the file's; counts must agree.
    assert cs.clip_score(tmp_path / "s.npz", str(clip_dir), prompts=prompts, device="cpu",
                         progress=False)["clip_score"] == pytest.approx(report["clip_score"], rel=1e-6)  # batch 64 vs 2: float32 last bits
    with pytest.raises(cs.ClipError, match="5 images but 4 prompts"):
        cs.clip_score(tmp_path / "s.npz", str(clip_dir), prompts=prompts[:4], device="cpu", progress=False)


def test_clip_refuses_a_model_that_is_not_clip(world, tmp_path):
    with pytest.raises(cs.ClipError, match=r"is a t5 model, not CLIP .*openai/clip-vit-large-patch14") as err:
        cs.load_clip(str(world["pipe"] / "text_encoder"))
    assert "\n" not in str(err.value)
    with pytest.raises(cs.ClipError, match="vae is a AutoencoderKL model, not CLIP"):
        cs.load_clip(str(world["pipe"] / "vae"))
    np.savez(tmp_path / "c.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.arange(2))
    with pytest.raises(cs.ClipError, match="no 'prompts' member"):
        cs.clip_score(tmp_path / "c.npz", str(world["pipe"] / "text_encoder"), device="cpu", progress=False)


# ------------------------------------------------------------------------------------------ FLUX.1


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path):
    """A tiny FLUX.1 pipeline folder (CLIP + T5 text encoders, guidance-embedding transformer) loaded
    with a 2-head student built from its transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from shd_diffusion.models.diffusers_t2i import student_from_teacher

    root = tmp_path_factory.mktemp("flux")
    vocab, t5_tok = _word_tokenizer()
    clip_tok = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=16)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_tok.vocab_size, hidden_size=10, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=1, bos_token_id=0, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                        shift_factor=0.1, scaling_factor=0.5)
    teacher = _randomise(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                                pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4)), 3)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                 text_encoder_2=t5, tokenizer_2=t5_tok, transformer=teacher).save_pretrained(root / "flux")
    student = _randomise(student_from_teacher(teacher, num_single_layers=1, num_attention_heads=2), 4)
    student.save_pretrained(root / "student")
    config = ts.teacher_transformer_config(root / "flux")
    loaded, _ = ts.load_student(root / "student", config)
    return ts.load_pipeline(root / "flux", loaded)


def test_flux_images_equal_the_direct_call_and_do_not_depend_on_the_batch(flux_pipe, tmp_path):
    kw = dict(prompts=PROMPTS, num_inference_steps=2, guidance_scale=3.5, height=16, width=16,
              pipeline_kwargs={"max_sequence_length": 8})
    sampler = ts.PromptSampler(flux_pipe, **kw)
    images, _ = sampler.sample([0, 2])
    direct = flux_pipe(**sampler.call_kwargs([0, 2])).images  # PIL, the pipeline's default output
    assert np.array_equal(images, np.stack([np.asarray(im) for im in direct]))
    assert images.shape == (2, 16, 16, 3) and images.std() > 5
    outs = []
    for bs in (1, 3):
        ts.sample_prompts(ts.PromptSampler(flux_pipe, **kw), tmp_path / f"b{bs}", shard_size=3, batch_size=bs)
        with np.load(ts.assemble_prompts(tmp_path / f"b{bs}")) as z:
            outs.append(z["arr_0"])
    assert np.array_equal(outs[0], outs[1])
    assert np.array_equal(outs[0][[0, 2]], images)


def test_assemble_refuses_an_extra_member_that_would_need_pickle_or_has_other_rows(pipe, tmp_path):
    from shd_diffusion.shards import assemble

    ts.sample_prompts(_sampler(pipe), tmp_path, num_samples=2, shard_size=2, batch_size=2)
    for bad in (np.array([object(), object()]), np.array(["a", "b", "c"])):
        with pytest.raises(ValueError, match="extra member 'x' must be a non-object array of 2 rows"):
            assemble(tmp_path, extra={"x": bad})
    with np.load(assemble(tmp_path, extra={"x": np.zeros(2)}), allow_pickle=False) as z:
        assert z.files == ["arr_0", "arr_1", "x"]


def test_clip_from_the_offline_hub_cache_records_its_commit(clip_dir, tmp_path, monkeypatch):
    """A Hub id resolves offline through the Hugging Face cache; the report names the snapshot commit."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    offline_hub_cache(tmp_path, monkeypatch)("tiny/clip", clip_dir, rev)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), prompts=np.array(["a cat", "a dog"]))
    report = cs.clip_score(tmp_path / "s.npz", "tiny/clip", device="cpu", progress=False)
    assert report["clip"]["model"] == "tiny/clip" and report["clip"]["revision"] == rev
    with pytest.raises(cs.ClipError, match="--clip tiny/other: no model config found.*HF_HUB_OFFLINE"):
        cs.load_clip("tiny/other")


def test_a_teacher_pipeline_by_hub_id_loads_offline_from_the_cache(world, tmp_path, monkeypatch):
    offline_hub_cache(tmp_path, monkeypatch)("tiny/pixart", world["pipe"])
    config = ts.teacher_transformer_config("tiny/pixart")
    assert config == ts.teacher_transformer_config(world["pipe"])
    student, _ = ts.load_student(world["ckpt"], config)
    hub_pipe = ts.load_pipeline("tiny/pixart", student)
    assert weights_sha256(hub_pipe.transformer.state_dict()) == world["student_sha"]
    with pytest.raises(ts.T2ISampleError, match="tiny/missing: cannot read transformer/config.json"):
        ts.teacher_transformer_config("tiny/missing")
