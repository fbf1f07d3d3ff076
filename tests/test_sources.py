"""The one loader (files, folders, Hub ids) and the exact DiT <-> diffusers conversion.

Hub tests build a fake Hugging Face cache (``models--org--repo/snapshots/<rev>/...`` and
``refs/main``) and switch huggingface_hub to offline mode, so its real resolution code runs and
nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from shd_diffusion.cli import BadInput
from shd_diffusion.models import (
    WeightsError,
    DiT,
    create_model,
    from_diffusers,
    load_model,
    load_weights,
    parse_hub_id,
    to_diffusers,
)
from shd_diffusion.models.dit_transformer_freq_shift import DiTTransformer2DModelFreqShift
from shd_diffusion.models.loading import weights_entry

# norm_eps = 0.5 (not diffusers' 1e-5) so that losing the MLP-norm eps in a conversion changes
# the output far beyond the tolerance; 10 classes + the null row.
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=0.5)
DIT_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10)
REV = "0123456789abcdef0123456789abcdef01234567"


def random_diffusers_dit(seed: int = 0, tied: bool = True, **overrides) -> DiTTransformer2DModel:
    """A tiny DiTTransformer2DModel with every weight random (diffusers zero-inits adaLN and outputs).

    ``tied``: every block's timestep/label embedder is block 0's, as in converted DiT checkpoints.
    """
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        if tied:
            state = model.state_dict()
            for k, v in state.items():
                if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                    v.copy_(state["transformer_blocks.0." + k.split(".", 2)[2]])
    return model.eval()


def inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])[:n], torch.tensor([0, 3, 9, 10])[:n]


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Same math, different kernels (fused vs split qkv GEMMs): float32 rounding, a few ulp of the
    # output scale after 2 blocks; 1e-5 of max |ref| leaves ~100x headroom and is far below the
    # 1e-1-scale effect of a wrong timestep shift or norm eps (checked below).
    tol = 1e-5 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol


def test_from_diffusers_is_exact_and_reads_the_architecture(tmp_path):
    ref_model = random_diffusers_dit()
    ref_model.save_pretrained(tmp_path / "dit")
    dit = from_diffusers(tmp_path / "dit")
    assert isinstance(dit, DiT)
    cfg = dit.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size, cfg.num_classes) == (2, 16, 2, 2, 8, 10)
    assert cfg.learn_sigma and cfg.freq_shift == 1 and cfg.mlp_norm_eps == 0.5
    x, t, y = inputs()  # y includes the null class 10
    with torch.no_grad():
        ref = ref_model(x, timestep=t, class_labels=y).sample
        assert_close(dit(x, t, y), ref)
        # Negative controls: the original DiT's timestep features or eps would not pass.
        wrong_shift = DiT(**{**dict(cfg), "freq_shift": 0}).eval()
        wrong_shift.load_state_dict(dit.state_dict())
        wrong_eps = DiT(**{**dict(cfg), "mlp_norm_eps": 1e-6}).eval()
        wrong_eps.load_state_dict(dit.state_dict())
        for wrong in (wrong_shift, wrong_eps):
            assert (wrong(x, t, y) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_to_diffusers_round_trips_both_timestep_conventions(tmp_path):
    x, t, y = inputs()
    torch.manual_seed(3)
    for shift, cls in ((1, DiTTransformer2DModel), (0, DiTTransformer2DModelFreqShift)):
        dit = DiT(**DIT_ARCH, freq_shift=shift, mlp_norm_eps=1e-3).eval()
        with torch.no_grad():
            for p in dit.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.3)
        transformer = to_diffusers(dit)
        assert type(transformer) is cls
        transformer.save_pretrained(tmp_path / f"shift{shift}")
        reloaded = cls.from_pretrained(tmp_path / f"shift{shift}").eval()  # recomputes its pos table
        with torch.no_grad():
            ref = dit(x, t, y)
            assert_close(transformer(x, timestep=t, class_labels=y).sample, ref)
            assert_close(reloaded(x, timestep=t, class_labels=y).sample, ref)
            back = from_diffusers(reloaded)
            assert back.config.freq_shift == shift
            assert_close(back(x, t, y), ref)


def test_from_diffusers_refuses_what_dit_cannot_express():
    with pytest.raises(WeightsError, match="block 1 has its own norm1.emb"):
        from_diffusers(random_diffusers_dit(tied=False))
    with pytest.raises(WeightsError, match="out_channels=6"):
        from_diffusers(random_diffusers_dit(out_channels=6))
    with pytest.raises(WeightsError, match="mlp_ratio"):
        to_diffusers(DiT(**DIT_ARCH, mlp_ratio=2.0))


# ------------------------------------------------------------------------------ Hub layout


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; returns a function that adds a repo snapshot."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add_repo(repo_id: str, files: dict[str, Path | bytes], revision: str = REV) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        for name, content in files.items():
            target = snapshot / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copy(content, target)
            else:
                target.write_bytes(content)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return snapshot

    return add_repo


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, hub_cache):
    ref_model = random_diffusers_dit()
    ref_model.save_pretrained(tmp_path / "dit")
    files = {f"transformer/{p.name}": p for p in (tmp_path / "dit").iterdir()}
    files["model_index.json"] = json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}).encode()
    hub_cache("org/tiny-dit", files)
    official = {k: v for k, v in from_diffusers(ref_model).state_dict().items()}
    torch.save({"ema": official}, tmp_path / "ema.pt")
    hub_cache("org/tiny-official", {"ckpt/ema.pt": tmp_path / "ema.pt"})

    x, t, y = inputs()
    with torch.no_grad():
        ref = ref_model(x, timestep=t, class_labels=y).sample
        for spec in ("org/tiny-dit", "org/tiny-dit:transformer", f"org/tiny-dit@{REV}:transformer"):
            assert_close(load_model(spec)(x, t, y), ref)
        # A file inside a repo; the official .pt does not name its architecture.
        model = load_model("org/tiny-official:ckpt/ema.pt", "DiT-S/2", overrides={**DIT_ARCH, "freq_shift": 1, "mlp_norm_eps": 0.5})
        assert_close(model(x, t, y), ref)


def test_load_weights_adopts_a_diffusers_teacher_of_the_configured_size(tmp_path, hub_cache):
    ref_model = random_diffusers_dit()
    ref_model.save_pretrained(tmp_path / "dit")
    hub_cache("org/teacher", {f"transformer/{p.name}": p for p in (tmp_path / "dit").iterdir()})
    built = create_model("DiT-S/2", **DIT_ARCH)  # what training builds from teacher.model
    teacher = load_weights(built, "org/teacher:transformer")
    x, t, y = inputs()
    with torch.no_grad():
        assert_close(teacher(x, t, y), ref_model(x, timestep=t, class_labels=y).sample)
    with pytest.raises(WeightsError, match=r"differs in depth=2 \(model: 3\)"):
        load_weights(create_model("DiT-S/2", **{**DIT_ARCH, "depth": 3}), tmp_path / "dit")
    with pytest.raises(WeightsError, match="but the model is a MDTv2"):
        load_weights(create_model("MDTv2-S/2", **{**DIT_ARCH, "depth": 4, "decode_layer": 2}), tmp_path / "dit")


class Foreign:
    """A pickled object that a weights-only load must refuse."""


@pytest.mark.parametrize(
    "case, needles",
    [
        ("hub_not_cached", ["org/missing", "not in the local Hugging Face cache", "offline mode on", "hf download"]),
        ("other_class", ["AutoencoderKL", "not a DiT / MDTv2 model"]),
        ("no_registry_fit", ["does not fit DiT", "no registry config has these sizes", "wrong shapes"]),
        ("empty", ["is empty (0 bytes)", "fetch the file again"]),
        ("random_bytes", ["is not a torch checkpoint", "torch.save(state_dict, path)"]),
        ("pickled_object", ["pickles other objects", "Foreign", "re-save just the state dict"]),
        ("not_there", ["does not exist and is not a hub id"]),
    ],
)
def test_bad_sources_fail_with_one_clear_line(case, needles, tmp_path, hub_cache):
    path: str | Path = tmp_path / "bad.pt"
    if case == "hub_not_cached":
        path = "org/missing:transformer"
    elif case == "other_class":
        AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path / "vae")
        path = tmp_path / "vae"
    elif case == "no_registry_fit":
        torch.save(DiT(**{**DIT_ARCH, "hidden_size": 24, "num_heads": 3}).state_dict(), path)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random_bytes":
        path.write_bytes(random.Random(1).randbytes(4096))
    elif case == "pickled_object":
        torch.save({"ema": DiT(**DIT_ARCH).state_dict(), "extra": Foreign()}, path)
    elif case == "not_there":
        path = "./no/such/file.pt"
    with pytest.raises((BadInput, FileNotFoundError)) as info:
        load_model(path, "DiT-S/2", overrides=DIT_ARCH)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle.lower() in text.lower(), text
    assert "weights_only=False" not in text and "will likely succeed" not in text


def test_parse_hub_id():
    assert parse_hub_id("facebook/DiT-XL-2-256:transformer").path == "transformer"
    ref = parse_hub_id("org/repo@v1.0:ckpt/ema.pt")
    assert (ref.repo_id, ref.revision, ref.path) == ("org/repo", "v1.0", "ckpt/ema.pt")
    for not_hub in ("./runs/x", "/abs/path.pt", "file.pt", "a/b/c"):
        assert parse_hub_id(not_hub) is None


@pytest.mark.usefixtures("fresh_accelerate")
def test_trainer_takes_a_diffusers_teacher_from_the_hub(tmp_path, hub_cache):
    from test_training import make_cfg, make_trainer

    # The tiny teacher of tests/test_training.py (DiT-S/4 shape, 48 wide, 4 blocks, 4 heads, 1 x 32 x 32).
    teacher = random_diffusers_dit(num_attention_heads=4, attention_head_dim=12, in_channels=1, out_channels=2,
                                   num_layers=4, sample_size=32, patch_size=4, norm_eps=1e-5)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.2)  # keep a 4-block random model's outputs O(1)
    teacher.save_pretrained(tmp_path / "dit")
    hub_cache("org/teacher", {f"transformer/{p.name}": p for p in (tmp_path / "dit").iterdir()})
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["teacher.checkpoint=org/teacher:transformer"])
    trainer = make_trainer(cfg, tmp_path)
    assert isinstance(trainer.teacher, DiT) and trainer.teacher.config.freq_shift == 1
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 32, 32, generator=g), torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert_close(trainer.teacher(x, t, y), teacher(x, timestep=t, class_labels=y).sample)


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("teacher, needles", [
    ("org/missing:transformer", ["org/missing", "not in the local hugging face cache", "hf download"]),
    ("{root}/vae", ["AutoencoderKL", "not a DiT / MDTv2 model"]),
    ("{root}/pickled.pt", ["pickled.pt", "pickles other objects", "re-save just the state dict"]),
])
def test_training_refuses_a_bad_teacher_source_in_one_line(teacher, needles, tmp_path, hub_cache):
    import importlib.util

    from cli_cases import assert_refused, call, snapshot
    from test_training import COMMON, DIT_STUDENT, DIT_TEACHER, REPO, _shared

    spec = importlib.util.spec_from_file_location("train_mdt_shd", REPO / "scripts" / "train_mdt_shd.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path / "vae")
    torch.save({"ema": DiT(**DIT_ARCH).state_dict(), "extra": Foreign()}, tmp_path / "pickled.pt")
    argv = [*COMMON, *DIT_STUDENT, *_shared("student"), *DIT_TEACHER, *_shared("teacher.model"), "distill.mode=kd",
            f"teacher.checkpoint={teacher.format(root=tmp_path)}", "train.steps=2", f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=r", "--no-progress"]
    before = snapshot(tmp_path)
    outcome = call(script.main, argv)
    assert_refused(outcome, *needles, code=2)
    assert "weights_only=False" not in outcome.stderr
    assert snapshot(tmp_path) == before


def test_any_corrupt_bytes_are_one_named_refusal(tmp_path):
    """Random bytes make torch's unpickler raise many kinds of error; each must become one refusal."""
    from shd_diffusion.checkpoint import CheckpointError
    from shd_diffusion.models.loading import load_checkpoint_file

    path = tmp_path / "junk.pt"
    for seed in range(300):
        rng = random.Random(seed)
        path.write_bytes(rng.randbytes(rng.randint(1, 256)))
        with pytest.raises(CheckpointError, match="junk.pt"):
            load_checkpoint_file(path)


def test_weights_entry_prefers_ema_then_model():
    """The entry inspect_checkpoint names and extract_state_dict reads: one rule."""
    state = {"w": torch.zeros(1)}
    assert weights_entry({"ema": state, "model": state, "step": 3}) == "ema"
    assert weights_entry({"model": state, "ema": None}) == "model"
    assert weights_entry(state) is None  # a bare state dict
