"""Sampling for FID (shd_diffusion.sampler / .shards, python -m sampling.sample): determinism, resume,
npz layout, CFG layout, the DDIM loop.

Tiny randomly initialised models, 3-5 DDPM steps, pixel space (``--vae none``) except one test
with a tiny local AutoencoderKL. Everything runs on the CPU in a few seconds.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shd_diffusion.commands.sample import build_parser, main
from shd_diffusion.cli import BadInput
from shd_diffusion.diffusion import NOISE_BLOCK_STEPS, create_diffusion
from shd_diffusion.models import create_model
from shd_diffusion.models.mdt import power_cosine_cfg_scale
from shd_diffusion.models.sources import load_model
from shd_diffusion.sampler import (
    COMPILE_MODES,
    LABEL_KEY,
    NOISE_KEY,
    SEED_SCHEME,
    GuidedDenoiser,
    Sampler,
    class_labels,
    image_seeds,
    resolve_autocast,
    resolve_clip_denoised,
    resolve_guidance_channels,
    resolve_guidance_schedule,
    to_uint8_images,
)
from shd_diffusion.seeding import derive_seed
from shd_diffusion.shards import (
    ShardError,
    assemble,
    num_shards,
    read_shard,
    run_shards,
    shard_path,
    shard_range,
    shards_for_rank,
    write_shard,
)
from shd_diffusion.vae import load_vae

NUM_CLASSES = 10
CPU = torch.device("cpu")


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter: the zero-initialised adaLN/final layers would output eps = 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


def tiny(name: str = "DiT-S/2", in_channels: int = 1, **kw: object) -> nn.Module:
    arch = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES, in_channels=in_channels)
    if name.startswith("MDTv2"):
        arch.update(depth=4, decode_layer=2)
    arch.update(kw)
    return _randomise(create_model(name, **arch))


@pytest.fixture(scope="module")
def pixel_model() -> nn.Module:
    return tiny()


def make_sampler(model: nn.Module, steps: int = 5, cfg_scale: float = 3.8, seed: int = 0, labels: str = "balanced") -> Sampler:
    channels = resolve_guidance_channels(3, model.in_channels)
    denoiser = GuidedDenoiser(model, cfg_scale, resolve_guidance_schedule("auto", model), 4.0, channels)
    c, s = model.config.in_channels, model.config.input_size
    return Sampler(denoiser, create_diffusion(str(steps)), (c, s, s), NUM_CLASSES, CPU, seed=seed,
                   label_rule=labels, clip_denoised=True)


def sample_run(sampler: Sampler, out: Path, n: int, shard: int, batch: int, world: int = 1) -> Path:
    """Run every rank of a simulated `world` in turn, then assemble."""
    for rank in range(world):
        run_shards(sampler, out, n, shard, batch, rank=rank, world_size=world, manifest={"tag": "t"})
    return assemble(out)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


# --------------------------------------------------------------------------------------------
# Label and seed rules
# --------------------------------------------------------------------------------------------


def test_label_rules():
    idx = np.arange(25)
    assert class_labels(idx, NUM_CLASSES).tolist() == [i % NUM_CLASSES for i in range(25)]
    # uniform: per-index (the same label whatever else is asked), seeded, in range, ~uniform.
    big = class_labels(np.arange(20_000), NUM_CLASSES, "uniform", seed=3)
    assert big.min() >= 0 and big.max() < NUM_CLASSES
    assert class_labels([7, 19_999], NUM_CLASSES, "uniform", seed=3).tolist() == [big[7], big[19_999]]
    counts = np.bincount(big, minlength=NUM_CLASSES)
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 30  # 9 dof: p ~ 4e-4
    assert not np.array_equal(big, class_labels(np.arange(20_000), NUM_CLASSES, "uniform", seed=4))
    assert big[7] == derive_seed(LABEL_KEY, 3, 7) % NUM_CLASSES  # oracle: the one seed derivation
    with pytest.raises(ValueError, match="label rule"):
        class_labels(idx, NUM_CLASSES, "sorted")  # type: ignore[arg-type]


def test_image_seeds_are_per_index():
    s = image_seeds(np.arange(1000), seed=0)
    assert s.dtype == np.int64 and (s >= 0).all() and len(set(s.tolist())) == 1000
    assert image_seeds([500], 0)[0] == s[500]
    # Neighbouring base seeds give unrelated streams (not a shift of each other).
    assert not set(image_seeds(np.arange(1000), 1).tolist()) & set(s.tolist())
    # Oracle: the one seed derivation, keyed by (noise key, base seed, index).
    assert s[500] == derive_seed(NOISE_KEY, 0, 500) and image_seeds([7], 3)[0] == derive_seed(NOISE_KEY, 3, 7)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        image_seeds([0], -1)


def test_shard_split_and_rank_assignment():
    assert num_shards(10, 3) == 4
    assert [list(shard_range(k, 10, 3)) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert shards_for_rank(4, 0, 3) == [0, 3] and shards_for_rank(4, 2, 3) == [2]
    owned = sorted(k for r in range(3) for k in shards_for_rank(4, r, 3))
    assert owned == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# CFG batch layout (stub model)
# --------------------------------------------------------------------------------------------


class StubModel(nn.Module):
    """Records every call; eps = 1 for conditional rows, 0 for null rows; channel 3 and the
    variance channels carry the label so the test can see which half they came from."""

    in_channels = 4
    null_class = NUM_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), y.clone()))
        cond = (y != self.null_class).float().view(-1, 1, 1, 1).expand(-1, 4, *x.shape[2:])  # (B, 4, H, W)
        out = torch.cat([cond, y.float().view(-1, 1, 1, 1).expand_as(cond)], dim=1)  # (B, 8, H, W)
        out[:, 3] = y.float().view(-1, 1, 1)
        return out


def test_cfg_batch_layout_and_guidance_with_stub():
    stub = StubModel()
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([999, 500, 0])
    y = torch.tensor([4, 5, 6])
    out = GuidedDenoiser(stub, cfg_scale=3.0, schedule="constant", guidance_channels=3)(x, t, y)
    (xs, ts, ys), = stub.calls
    assert torch.equal(xs, torch.cat([x, x])) and torch.equal(ts, torch.cat([t, t]))
    assert ys.tolist() == [4, 5, 6, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]  # cond first, null second
    assert out.shape == (3, 8, 2, 2)
    assert torch.all(out[:, :3] == 3.0)  # 0 + 3 * (1 - 0): guided
    assert torch.equal(out[:, 3], y.float().view(-1, 1, 1).expand(-1, 2, 2))  # 4th eps channel: conditional, unguided
    assert torch.equal(out[:, 4:], y.float().view(-1, 1, 1, 1).expand(-1, 4, 2, 2))  # variance from the cond half

    # Power-cosine: per-sample scale from the original timestep; ~1 at t = 999, s at t = 0.
    stub.calls.clear()
    out = GuidedDenoiser(stub, cfg_scale=3.0, schedule="power-cosine", guidance_channels=None)(x, t, y)
    expected = power_cosine_cfg_scale(t, 3.0, 1000, 4.0)
    assert torch.allclose(out[:, 0, 0, 0], expected)
    # All 4 eps channels guided: channel 3 (cond = label, null = 10) is now extrapolated too.
    assert torch.allclose(out[:, 3, 0, 0], NUM_CLASSES + expected * (y - NUM_CLASSES))
    assert abs(expected[0].item() - 1.0) < 1e-6 and expected[2].item() == pytest.approx(3.0)

    # Scale 1: one plain conditional forward, no null rows.
    stub.calls.clear()
    GuidedDenoiser(stub, cfg_scale=1.0)(x, t, y)
    assert stub.calls[0][2].tolist() == [4, 5, 6]


def test_sampler_feeds_label_rule_and_per_image_noise_to_the_model():
    stub = StubModel()
    sampler = Sampler(GuidedDenoiser(stub, 2.0), create_diffusion("2"), (4, 2, 2), NUM_CLASSES, CPU, seed=5)
    sampler.decode = lambda z: z[:, :3].clamp(-1, 1)  # type: ignore[method-assign]
    sampler.sample([13, 4, 27])
    assert len(stub.calls) == 2  # one model call per step
    x0, t0, y0 = stub.calls[0]
    assert y0.tolist() == [3, 4, 7, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    assert t0.tolist() == [999] * 6  # original timestep scale
    # x_T of image i is the first draw of its own generator.
    g = torch.Generator().manual_seed(derive_seed(NOISE_KEY, 5, 27))
    assert torch.equal(x0[2], torch.randn((4, 2, 2), generator=g))


@pytest.mark.parametrize("name", ["DiT-S/2", "MDTv2-S/2"])
def test_denoiser_matches_model_forward_with_cfg(name):
    model = tiny(name, in_channels=4)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 400, 3]), torch.tensor([1, 2, 3])
    null = torch.full_like(y, model.null_class)
    ref = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.8)[:3]
    got = GuidedDenoiser(model, 3.8, resolve_guidance_schedule("auto", model), 4.0, 3)(x, t, y)
    assert torch.equal(got, ref)


def test_guidance_channels_resolution():
    assert resolve_guidance_channels(3, 4) == 3
    assert resolve_guidance_channels("all", 4) is None
    assert resolve_guidance_channels(3, 1) is None  # pixel model: 3 means every channel
    assert resolve_guidance_schedule("auto", tiny("MDTv2-S/2")) == "power-cosine"
    assert resolve_guidance_schedule("auto", tiny()) == "constant"


def test_compile_mode_reaches_torch_compile(pixel_model, tmp_path, monkeypatch, fresh_accelerate):
    seen: list[tuple[nn.Module, dict]] = []

    def fake_compile(model: nn.Module, **kwargs: object) -> nn.Module:
        seen.append((model, kwargs))
        return model  # eager: the CPU test checks the wiring, not inductor

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert COMPILE_MODES == ("default", "reduce-overhead", "max-autotune")
    for mode in COMPILE_MODES:
        GuidedDenoiser(pixel_model, compile=True, compile_mode=mode)
    assert [kw for _, kw in seen] == [{"mode": m} for m in COMPILE_MODES]
    seen.clear()
    GuidedDenoiser(pixel_model, compile=False, compile_mode="reduce-overhead")
    assert seen == []  # no --compile, no torch.compile
    with pytest.raises(ValueError, match="unknown compile mode 'fast'.*reduce-overhead"):
        GuidedDenoiser(pixel_model, compile=True, compile_mode="fast")

    # Through the CLI: --compile-mode lands in torch.compile, and the CUDA-graph step marker
    # does not change the pixels.
    pixel_model.save_pretrained(tmp_path / "ckpt")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--num-samples", "2", "--steps", "2", "--shard-size", "2",
            "--batch-size", "2", "--vae", "none"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--compile", "--compile-mode", "reduce-overhead"]) == 0
    assert len(seen) == 1 and seen[0][1] == {"mode": "reduce-overhead"}
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    name = "samples_2x8x8x3.npz"
    assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "e" / name).read_bytes()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compile-mode", "fast"])
    assert main([*argv, "--out", str(tmp_path / "x"), "--compile-mode", "max-autotune"]) == 2  # needs --compile
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# Determinism across batch sizes and process counts
# --------------------------------------------------------------------------------------------


def test_an_image_depends_on_its_index_not_on_its_batch(pixel_model):
    # Noise and labels are per index, so other batch splits give the same images up to the last
    # bits that matrix kernels may change with the number of rows (that is why the batch size is
    # in the manifest); a batch-dependent noise stream would move them by O(1).
    sampler = make_sampler(pixel_model)
    idx = range(8)
    ref, labels = sampler.sample_latents(idx)
    assert ref.shape == (8, 1, 8, 8) and ref.std() > 0.1  # not a constant image
    one = torch.cat([sampler.sample_latents([i])[0] for i in idx])
    three = torch.cat([sampler.sample_latents(idx[s : s + 3])[0] for s in range(0, 8, 3)])
    torch.testing.assert_close(one, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(three, ref, atol=1e-4, rtol=0)
    # Same index, different neighbours and position in the batch: the same image.
    torch.testing.assert_close(sampler.sample_latents([5, 2])[0][0], ref[5], atol=1e-4, rtol=0)
    # The same batch twice: bitwise equal.
    assert torch.equal(sampler.sample_latents(idx)[0], ref)


def test_noise_stream_is_per_image_blocks_of_steps(pixel_model, monkeypatch):
    """Oracle for the noise definition: image i's generator gives x_T, then one
    randn((k, C, H, W)) per block of NOISE_BLOCK_STEPS ancestral steps (k = 25, 4 for 30 steps:
    29 noisy steps, the last step adds none); step j of a block uses entry j."""
    steps, idx = 30, [3, 0, 7]
    sampler = make_sampler(pixel_model, steps=steps)
    diff, shape = sampler.diffusion, sampler.latent_shape
    for i in idx:
        got, labels = sampler.sample_latents([i])  # one image: the same GEMMs as the oracle's
        g = torch.Generator().manual_seed(derive_seed(NOISE_KEY, 0, i))
        x = torch.randn(shape, generator=g)[None]  # (1, C, H, W)
        y = torch.as_tensor(labels)
        noisy = list(range(steps - 1, 0, -1))  # t = 29 .. 1
        blocks = [noisy[s : s + NOISE_BLOCK_STEPS] for s in range(0, len(noisy), NOISE_BLOCK_STEPS)]
        assert [len(b) for b in blocks] == [25, 4]
        for block in blocks:
            noise = torch.randn((len(block), *shape), generator=g)  # (k, C, H, W)
            for j, t in enumerate(block):
                x = diff.p_sample_step(sampler.denoiser, x, t, {"y": y}, clip_denoised=True, noise=noise[j : j + 1])["sample"]
        x = diff.p_sample_step(sampler.denoiser, x, 0, {"y": y}, clip_denoised=True)["sample"]  # no noise
        assert torch.equal(got, x), i

    # Generator calls: n for x_T + n per block, not n per step (the kernel-launch count on GPU).
    calls = []
    randn = torch.randn

    def counting(*args, **kwargs):
        calls.append(kwargs.get("generator") is not None)
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", counting)
    sampler.sample_latents(idx)
    assert sum(calls) == len(idx) * (1 + math.ceil((steps - 1) / NOISE_BLOCK_STEPS)) == 9


def test_noise_block_one_is_the_per_step_stream():
    """noise_block=1 reproduces the one-draw-per-step stream of p_sample_step's own generators path
    (so the block loop adds no other change), and other block sizes give other samples."""
    diff = create_diffusion("12")

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.3 * x + t.view(-1, 1, 1, 1) / 1000, torch.zeros_like(x)], dim=1)  # (B, 2C, H, W)

    # 2 x 3 x 3 = 18 values per image: CPU randn fills in groups of 16, so with a multiple of 16
    # one (k, C, H, W) draw would equal k (C, H, W) draws and hide a wrong block size.
    x_T = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (5, 6, 7)]

    x, g = x_T, gens()
    for t in range(11, -1, -1):
        x = diff.p_sample_step(model_fn, x, t, generators=g)["sample"]
    assert torch.equal(diff.p_sample_loop(model_fn, x_T, generators=gens(), noise_block=1), x)
    blocked = diff.p_sample_loop(model_fn, x_T, generators=gens(), noise_block=4)
    assert (blocked - x).abs().max() > 1e-3
    # Per-sample: sample 1 alone (its own generator) equals its row of the batch.
    alone = diff.p_sample_loop(model_fn, x_T[1:2], generators=gens()[1:2], noise_block=4)
    assert torch.equal(alone, blocked[1:2])
    with pytest.raises(ValueError, match="noise_block must be >= 1"):
        diff.p_sample_loop(model_fn, x_T, generators=gens(), noise_block=0)


def test_identical_for_one_and_two_processes(pixel_model, tmp_path):
    sampler = make_sampler(pixel_model, steps=3)
    one = sample_run(sampler, tmp_path / "w1", n=10, shard=3, batch=2)
    two = sample_run(sampler, tmp_path / "w2", n=10, shard=3, batch=2, world=2)
    assert one.name == two.name == "samples_10x8x8x3.npz"
    assert one.read_bytes() == two.read_bytes()  # same arrays, and a byte-reproducible archive


@pytest.mark.slow
def test_accelerate_launch_two_processes(pixel_model, tmp_path, fresh_accelerate):
    ckpt = tmp_path / "ckpt"
    pixel_model.save_pretrained(ckpt)
    args = ["--checkpoint", str(ckpt), "--num-samples", "6", "--steps", "3", "--shard-size", "2",
            "--batch-size", "2", "--vae", "none", "--cfg-scale", "2.0"]
    main([*args, "--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "sampling.sample", *args, "--out", str(tmp_path / "two")]
    # Generous: two processes import torch on a loaded CI box; a hang still fails instead of stalling.
    subprocess.run(cmd, check=True, cwd=Path(__file__).parents[1], timeout=600)
    a = tmp_path / "one" / "samples_6x8x8x3.npz"
    assert a.read_bytes() == (tmp_path / "two" / a.name).read_bytes()


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


class Killed(RuntimeError):
    pass


def test_resume_after_kill_matches_uninterrupted_run(pixel_model, tmp_path):
    sampler = make_sampler(pixel_model, steps=3)
    reference = sample_run(sampler, tmp_path / "ref", n=10, shard=3, batch=2)

    out = tmp_path / "run"

    def die_after_two(k: int) -> None:
        if k == 3:  # rank 1 of 2 owns shards 1 and 3: written, then the job dies
            raise Killed

    with pytest.raises(Killed):
        run_shards(sampler, out, 10, 3, 2, rank=1, world_size=2, manifest={"tag": "t"}, on_shard_done=die_after_two)
    # Leftovers of a writer killed mid-shard: a temp file, and an unreadable (truncated) shard.
    stray = shard_path(out, 0).with_name(".shard_000000.npz.dead999.tmp.npz")  # fileio.atomic_path's naming
    stray.write_bytes(b"partial")
    shard_path(out, 2).write_bytes(b"PK\x03\x04truncated")

    # Resume with a different process count: only the unfinished shards are sampled.
    done = run_shards(sampler, out, 10, 3, 2, rank=0, world_size=1, manifest={"tag": "t"})
    assert done == [0, 2]
    assert not stray.exists()
    assert run_shards(sampler, out, 10, 3, 2, manifest={"tag": "t"}) == []  # nothing left to do

    result = assemble(out)
    indices = np.concatenate([read_shard(shard_path(out, k))[2] for k in range(4)])
    assert sorted(indices.tolist()) == list(range(10))
    assert result.read_bytes() == reference.read_bytes()


def test_resume_with_other_settings_is_refused(pixel_model, tmp_path):
    sampler = make_sampler(pixel_model, steps=3)
    run_shards(sampler, tmp_path, 4, 2, 2, manifest={"seed": 0})
    with pytest.raises(ShardError, match=r"seed: 0 -> 1"):
        run_shards(sampler, tmp_path, 4, 2, 2, manifest={"seed": 1})
    with pytest.raises(ShardError, match="shard_size"):
        run_shards(sampler, tmp_path, 4, 4, 2, manifest={"seed": 0})
    # The batch size can change the last bits of the pixels, so it may not change on resume
    # either; the refusal writes nothing.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ShardError, match=r"batch_size: 2 -> 1"):
        run_shards(sampler, tmp_path, 4, 2, 1, manifest={"seed": 0})
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_folder_of_another_seed_scheme_is_refused(pixel_model, tmp_path):
    """A folder written before the seed scheme was recorded (other pixels for the same seed)."""
    import json

    from shd_diffusion.shards import read_manifest

    sampler = make_sampler(pixel_model, steps=3)
    run_shards(sampler, tmp_path, 4, 2, 2, manifest={"seed": 0})
    manifest = read_manifest(tmp_path)
    assert manifest["seed_scheme"] == SEED_SCHEME and manifest["sampler"] == "ddpm"
    del manifest["seed_scheme"]
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))  # as the old code wrote it
    with pytest.raises(ShardError, match=rf"other settings \(seed_scheme: None -> '{SEED_SCHEME}'\)"):
        run_shards(sampler, tmp_path, 4, 2, 2, manifest={"seed": 0})


def test_ddim_with_eta_zero_is_deterministic_and_differs_from_ddpm(pixel_model):
    ddpm = make_sampler(pixel_model, steps=4)
    ddim = make_sampler(pixel_model, steps=4)
    ddim.method = "ddim"
    z, _ = ddim.sample_latents([0, 3])
    assert torch.equal(z, ddim.sample_latents([0, 3])[0])  # the same images twice: bitwise equal
    # Oracle: the diffusion's own DDIM loop from the same x_T (eta 0 draws no further noise).
    x_T, gens = ddim.initial_noise([0, 3])
    y = torch.as_tensor(class_labels([0, 3], NUM_CLASSES))
    ref = ddim.diffusion.ddim_sample_loop(ddim.denoiser, x_T, {"y": y}, gens, eta=0.0, clip_denoised=True)
    assert torch.equal(z, ref)
    assert not torch.allclose(z, ddpm.sample_latents([0, 3])[0], atol=1e-3)
    assert ddim.stream_fields()["sampler"] == "ddim" and ddim.stream_fields()["ddim_eta"] == 0.0
    with pytest.raises(ValueError, match="needs method 'ddim'"):
        Sampler(ddpm.denoiser, ddpm.diffusion, ddpm.latent_shape, NUM_CLASSES, CPU, ddim_eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        Sampler(ddpm.denoiser, ddpm.diffusion, ddpm.latent_shape, NUM_CLASSES, CPU, method="euler")  # type: ignore[arg-type]


def test_cli_sampler_ddim_is_recorded_and_a_ddpm_folder_refuses_it(pixel_model, tmp_path, fresh_accelerate):
    from shd_diffusion.shards import read_manifest

    pixel_model.save_pretrained(tmp_path / "ckpt")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--num-samples", "3", "--steps", "3", "--shard-size", "3",
            "--batch-size", "3", "--vae", "none"]
    assert main([*argv, "--out", str(tmp_path / "ddim"), "--sampler", "ddim"]) == 0
    assert read_manifest(tmp_path / "ddim")["sampler"] == "ddim"
    images, _ = load_npz(tmp_path / "ddim" / "samples_3x8x8x3.npz")
    expected = make_sampler(pixel_model, steps=3)
    expected.method = "ddim"
    assert np.array_equal(images, expected.sample(range(3))[0])  # the library path, same settings

    assert main([*argv, "--out", str(tmp_path / "ddpm")]) == 0
    assert read_manifest(tmp_path / "ddpm")["sampler"] == "ddpm"
    before = (tmp_path / "ddpm" / "shards" / "manifest.json").read_bytes()
    assert main([*argv, "--out", str(tmp_path / "ddpm"), "--sampler", "ddim"]) == 2  # refused, nothing written
    assert (tmp_path / "ddpm" / "shards" / "manifest.json").read_bytes() == before
    assert main([*argv, "--out", str(tmp_path / "x"), "--ddim-eta", "0.5"]) == 2  # eta needs --sampler ddim


# --------------------------------------------------------------------------------------------
# npz layout and assembly errors
# --------------------------------------------------------------------------------------------


def test_npz_layout_labels_and_png(pixel_model, tmp_path):
    sampler = make_sampler(pixel_model, steps=3)
    run_shards(sampler, tmp_path, 12, 5, 5, manifest={})
    path = assemble(tmp_path, png_dir=tmp_path / "png")
    assert path == tmp_path / "samples_12x8x8x3.npz"
    images, labels = load_npz(path)
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i % NUM_CLASSES for i in range(12)]
    # Grayscale model: the three channels are copies.
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    # In index order: image i is what the sampler gives for index i alone.
    assert np.array_equal(images[7], sampler.sample([7])[0][0])
    # ADM's evaluator streams arr_0 by parsing the .npy header inside the zip itself.
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((12, 8, 8, 3), False, np.uint8)
        assert np.frombuffer(f.read(), dtype=np.uint8).reshape(shape).tobytes() == images.tobytes()
    from PIL import Image

    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs[0] == "000000.png" and len(pngs) == 12
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000011.png")), images[11])


def test_to_uint8_uses_dit_rounding():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)
    got = to_uint8_images(x)[0, 0, :, 0].tolist()
    assert got == [0, 0, 64, 128, 255, 255, 255]  # clamp(127.5 x + 128) truncated


def _fake_run(out: Path, n: int, shard: int) -> None:
    from shd_diffusion.shards import write_manifest

    write_manifest(out, {"num_samples": n, "shard_size": shard})
    for k in range(num_shards(n, shard)):
        r = shard_range(k, n, shard)
        write_shard(shard_path(out, k), np.zeros((len(r), 2, 2, 3), np.uint8), np.zeros(len(r)), np.arange(r.start, r.stop))


def test_assembly_errors_name_the_problem(tmp_path):
    _fake_run(tmp_path / "missing", 7, 3)
    shard_path(tmp_path / "missing", 1).unlink()
    with pytest.raises(ShardError, match=r"1 of 3 shards missing.*shard_000001\.npz"):
        assemble(tmp_path / "missing")

    _fake_run(tmp_path / "dup", 7, 3)
    write_shard(shard_path(tmp_path / "dup", 1), np.zeros((3, 2, 2, 3), np.uint8), np.zeros(3), np.array([2, 4, 5]))
    with pytest.raises(ShardError, match=r"duplicate image indices \[2\].*shard_000000\.npz, shard_000001\.npz"):
        assemble(tmp_path / "dup")

    _fake_run(tmp_path / "extra", 7, 3)
    write_shard(shard_path(tmp_path / "extra", 5), np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1), np.array([15]))
    with pytest.raises(ShardError, match="unexpected shard files.*shard_000005"):
        assemble(tmp_path / "extra")

    with pytest.raises(ShardError, match="manifest.json not found"):
        assemble(tmp_path / "nothing")
    assert not list(tmp_path.glob("*/samples_*"))  # nothing half-written


# --------------------------------------------------------------------------------------------
# Latent models, checkpoint loading and the command line
# --------------------------------------------------------------------------------------------


def test_latent_model_decodes_with_vae(tmp_path):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"), in_channels=4)
    model = tiny(in_channels=4)
    sampler = make_sampler(model, steps=3)
    sampler.vae, sampler.clip_denoised = vae, False
    images, _ = sampler.sample([0, 1, 2])
    assert images.shape == (3, 16, 16, 3)  # the VAE upsamples 2x
    # Same as decoding the latents by hand with the SD scaling.
    x_T, gens = sampler.initial_noise([0, 1, 2])
    y = torch.as_tensor(class_labels([0, 1, 2], NUM_CLASSES))
    latents = sampler.diffusion.p_sample_loop(sampler.denoiser, x_T, {"y": y}, gens)  # (3, 4, 8, 8)
    with torch.no_grad():
        z = vae.decode(latents / 0.18215).sample
    assert np.array_equal(images, to_uint8_images(z))
    with pytest.raises(BadInput, match="pixel-space"):
        load_vae("none", in_channels=4)
    assert load_vae("auto", in_channels=1) is None


def test_load_model_from_every_checkpoint_kind(pixel_model, tmp_path):
    arch = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES, in_channels=1)
    ref = pixel_model.state_dict()
    other = {k: v + 1 for k, v in ref.items()}

    pixel_model.save_pretrained(tmp_path / "pretrained")
    loaded = load_model(tmp_path / "pretrained")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())

    torch.save(ref, tmp_path / "official.pt")  # DiT release layout: a bare EMA state dict
    loaded = load_model(tmp_path / "official.pt", "DiT-S/2", overrides=arch)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    with pytest.raises(ValueError, match="pass --model"):
        load_model(tmp_path / "official.pt")

    student = {"name": "DiT-S/2", **arch}
    torch.save({"ema": ref, "model": other, "step": 3, "config": {"student": student}}, tmp_path / "train.pt")
    ema = load_model(tmp_path / "train.pt")  # architecture from the checkpoint's config
    raw = load_model(tmp_path / "train.pt", use_ema=False)
    k = "final_layer.linear.weight"
    assert torch.equal(ema.state_dict()[k], ref[k]) and torch.equal(raw.state_dict()[k], other[k])


def test_load_model_logs_which_weights(pixel_model, tmp_path, capsys):
    arch = {"input_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2, "num_classes": NUM_CLASSES, "in_channels": 1}
    ref = pixel_model.state_dict()
    pixel_model.save_pretrained(tmp_path / "pretrained")
    torch.save(ref, tmp_path / "official.pt")
    torch.save({"ema": ref, "model": ref, "config": {"student": {"name": "DiT-S/2", **arch}}}, tmp_path / "train.pt")
    torch.save({"model": ref}, tmp_path / "model_only.pt")

    def log_of(path: Path, use_ema: bool, name: str | None = None) -> str:
        load_model(path, name, use_ema, arch if name else None, verbose=True)
        return capsys.readouterr().out

    assert "--no-use-ema ignored: the folder holds one set of weights" in log_of(tmp_path / "pretrained", False)
    assert "ignored" not in log_of(tmp_path / "pretrained", True)
    assert "bare state dict" in log_of(tmp_path / "official.pt", True, "DiT-S/2")
    assert "bare state dict (DiT's release files hold EMA weights); --no-use-ema ignored" in log_of(
        tmp_path / "official.pt", False, "DiT-S/2")
    assert "its 'ema' weights" in log_of(tmp_path / "train.pt", True)
    assert "its 'model' (raw training) weights" in log_of(tmp_path / "train.pt", False)
    assert "its 'model' weights: it has no 'ema' entry" in log_of(tmp_path / "model_only.pt", True, "DiT-S/2")
    load_model(tmp_path / "train.pt")  # verbose defaults off: library callers (the demo) stay quiet
    assert capsys.readouterr().out == ""


PAPER_DEFAULTS = {  # dest: (default, its option as --help prints it)
    "num_samples": (50_000, "--num-samples"),
    "steps": (250, "--steps"),
    "cfg_scale": (3.8, "--cfg-scale"),
    "guidance_schedule": ("auto", "--guidance-schedule"),
    "scale_pow": (4.0, "--scale-pow"),
    "guidance_channels": (3, "--guidance-channels"),
    "labels": ("balanced", "--labels"),
    "seed": (0, "--seed"),
    "use_ema": (True, "--use-ema"),
    "vae": ("auto", "--vae"),
    "precision": ("auto", "--precision"),
    "compile": (False, "--compile"),
    "compile_mode": ("default", "--compile-mode"),
    "batch_size": (250, "--batch-size"),
    "shard_size": (1000, "--shard-size"),
    "clip_denoised": ("auto", "--clip-denoised"),
    "sampler": ("ddpm", "--sampler"),
}


def test_cli_defaults_are_the_paper_setting_and_help_shows_each():
    args = build_parser().parse_args(["--checkpoint", "ckpt", "--out", "out"])
    for dest, (default, _) in PAPER_DEFAULTS.items():
        assert getattr(args, dest) == default, dest
    # Help entries: a line indented by two spaces starts one ("  --steps STEPS ..."); deeper
    # indented lines continue it. Map every option string to its entry's lines.
    entries: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in build_parser().format_help().splitlines():
        if re.match(r"^  -", line):
            lines = [line]
            for opt in re.findall(r"(?<![\w-])(--?[\w-]+)", line.strip().split("  ")[0]):
                entries[opt] = lines
        elif line.startswith("    "):
            lines.append(line)
        else:
            lines = []
    for dest, (default, option) in PAPER_DEFAULTS.items():
        entry = " ".join(" ".join(entries[option]).split())  # unwrapped
        assert f"(default: {default})" in entry, f"{option}: {entry}"
    assert "reduce-overhead = CUDA graphs" in " ".join(" ".join(entries["--compile-mode"]).split())


def test_cli_end_to_end(pixel_model, tmp_path, fresh_accelerate):
    pixel_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--num-samples", "5", "--steps", "3",
            "--shard-size", "2", "--batch-size", "2", "--vae", "none", "--seed", "1"]
    assert main(argv) == 0
    images, labels = load_npz(out / "samples_5x8x8x3.npz")
    assert images.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    # Same as the library path with the same settings.
    expected = make_sampler(pixel_model, steps=3, seed=1).sample(range(5))[0]
    assert np.array_equal(images, expected)
    first = (out / "samples_5x8x8x3.npz").read_bytes()
    (out / "shards" / "shard_000001.npz").unlink()
    assert main(argv) == 0  # resumes: recomputes the one missing shard
    assert (out / "samples_5x8x8x3.npz").read_bytes() == first
    assert main(["--assemble", str(out)]) == 0


def _save_training_checkpoint(model: nn.Module, path: Path) -> None:
    """``model`` (a :func:`tiny` DiT) as this package's training checkpoint, raw and EMA weights."""
    arch = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES, in_channels=1)
    state = model.state_dict()
    torch.save({"ema": state, "model": {k: v + 1 for k, v in state.items()}, "config": {"student": {"name": "DiT-S/2", **arch}}}, path)


def test_resume_with_other_weights_at_the_same_path_is_refused(tmp_path, fresh_accelerate, capsys):
    """A killed run whose checkpoint was replaced in place: resuming would put two models in one
    .npz. The manifest records the weights by content, so the rerun is refused and writes nothing;
    with the original weights back, even at another path, it resumes to the uninterrupted result."""
    import json

    from cli_cases import snapshot

    from shd_diffusion.models.loading import weights_sha256
    from shd_diffusion.shards import read_manifest

    first, other = tiny(), _randomise(tiny(), seed=1)
    ckpt, out, ref = tmp_path / "ckpt.pt", tmp_path / "out", tmp_path / "ref"
    _save_training_checkpoint(first, ckpt)
    argv = ["--checkpoint", str(ckpt), "--num-samples", "4", "--steps", "2", "--shard-size", "2",
            "--batch-size", "2", "--vae", "none"]
    assert main([*argv, "--out", str(ref)]) == 0  # the uninterrupted run
    assert read_manifest(ref)["weights_sha256"] == weights_sha256(first.state_dict())
    assert main([*argv, "--out", str(out)]) == 0
    shard_path(out, 1).unlink()  # as if killed before its second shard
    (out / "samples_4x8x8x3.npz").unlink()
    original = ckpt.read_bytes()
    _save_training_checkpoint(other, ckpt)  # replaced in place, same path, same shapes
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "weights_sha256" in err and "mix two models" in err and "new --out" in err
    assert snapshot(out) == before  # nothing appended
    # The original weights back, copied to another path (a requeued job's local copy): the same
    # model by content, so the folder resumes to the uninterrupted result.
    moved = tmp_path / "moved" / "ckpt.pt"
    moved.parent.mkdir()
    moved.write_bytes(original)
    ckpt.unlink()
    argv[1] = str(moved)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("the checkpoint moved") == 1  # said once, not by every check
    assert (out / "samples_4x8x8x3.npz").read_bytes() == (ref / "samples_4x8x8x3.npz").read_bytes()

    # A folder sampled before the weights were recorded cannot prove which weights made its shards.
    manifest = read_manifest(out)
    del manifest["weights_sha256"]
    (out / "shards" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    assert "weights_sha256: None -> " in capsys.readouterr().err


def test_weights_hash_is_by_content_not_by_layout(pixel_model, tmp_path):
    """Same weights from a training checkpoint, a bare state dict or a save_pretrained folder:
    one hash; one changed entry changes it."""
    from shd_diffusion.models.loading import weights_sha256

    state = pixel_model.state_dict()
    _save_training_checkpoint(pixel_model, tmp_path / "train.pt")
    pixel_model.save_pretrained(tmp_path / "folder")
    hashes = {weights_sha256(load_model(p).state_dict()) for p in (tmp_path / "train.pt", tmp_path / "folder")}
    assert hashes == {weights_sha256(state)}
    changed = {k: v.clone() for k, v in state.items()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1e-6
    assert weights_sha256(changed) != weights_sha256(state)
    assert weights_sha256(dict(reversed(list(state.items())))) == weights_sha256(state)  # key order does not count


def test_precision_auto_is_bf16_autocast_on_cuda_only():
    assert resolve_autocast("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_autocast("auto", torch.device("cpu")) is None  # fp32: no autocast
    assert resolve_autocast("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_autocast("fp32", torch.device("cuda")) is None


def test_clip_denoised_auto_clips_pixel_models_only():
    # The one rule the sampler, the exported pipeline and the export's recorded settings share.
    assert [resolve_clip_denoised("auto", pixel) for pixel in (True, False)] == [True, False]
    for on in ("on", True):
        assert resolve_clip_denoised(on, False) and resolve_clip_denoised(on, True)
    for off in ("off", False):
        assert not resolve_clip_denoised(off, True) and not resolve_clip_denoised(off, False)
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_clip_denoised("yes", True)
