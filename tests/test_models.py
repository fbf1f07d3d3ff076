"""DiT / MDTv2 (shd_diffusion.models): parity with the official code, loading, registry, passes."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from shd_diffusion.attention import SDPAProcessor, attention_probs, capture_attention, capture_qk
from shd_diffusion.models import (
    MODEL_NAMES,
    DiT,
    MDTv2,
    create_model,
    infer_architecture,
    load_checkpoint_file,
    load_official_state_dict,
)
from shd_diffusion.models.layers import AdaLNZeroBlock, Mlp, TimestepEmbedder, get_2d_sincos_pos_embed, guided_output
from shd_diffusion.models.mdt import RelativePositionBias, power_cosine_cfg_scale, random_masking

pytestmark = pytest.mark.numerics  # rerun on every CPU vector path (test_vector_paths)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "official"
# CI sets this so that a missing fixture fails instead of silently skipping the parity tests.
REQUIRE_FIXTURES = "SHD_REQUIRE_FIXTURES"

# Parity with the official code (README beside the fixtures).
# float64: a model moved with ``.double()`` computes everything in float64 (timestep features,
# guidance, captured maps), so a faithful re-implementation meets the ``*64`` keys to rounding:
# measured 0 to 8e-16 (outputs, CFG outputs, relative to max |output|) and up to 2e-15 (maps,
# absolute), on AVX-512 and under ATEN_CPU_CAPABILITY=default and =avx2. A LayerNorm eps of 1e-5,
# a timestep frequency shift of 1 or a fourth guided channel moves them by 1e-6 or more
# (test_float64_parity_catches_wrong_constants).
PARITY64_TOL = 1e-10
# float32: the stored float32 results carry the reference machine's rounding of ``exp`` in the
# timestep features (``t * f`` with t up to 999 multiplies one ulp by t), 2.2e-6 to 4.7e-6 of the
# output's maximum away from float64; a float32 run on another CPU lands up to 2.9e-6 away from
# them (measured here, AVX-512 and the default vector path). 1e-5 is what any CPU can promise: this
# test checks loading, layout and dtype handling in float32; the float64 test checks the constants.
OUT_RTOL = 1e-5  # max |ours - official| / max |official|, outputs and CFG outputs
MAP_ATOL = 1e-5  # max abs difference of attention probabilities
# Same math, two attention implementations (fused SDPA vs explicit softmax), moderate weights.
PATH_ATOL = 1e-5
# Their parameter gradients: measured max difference 6e-9 (DiT) and 0 (MDT) against gradients up
# to 0.15; a bias table cut off from autograd on either path would be off by ~1e-2.
GRAD_ATOL = 1e-6

TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
TINY_MDT = dict(TINY_DIT, depth=6, mask_ratio=0.3, decode_layer=2)


def fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(constructor config, tensors) of an official reference file.

    Skips when the file is absent, or fails when ``SHD_REQUIRE_FIXTURES=1`` (CI).
    """
    missing = pytest.fail if os.environ.get(REQUIRE_FIXTURES) == "1" else pytest.skip
    try:
        import safetensors
    except ImportError:
        missing("safetensors is not installed: it reads the official reference outputs")
    path = FIXTURES / f"{name}.safetensors"
    if not path.is_file():
        missing(f"official reference outputs not found at {path} (shared/ must sit beside the repo)")
    with safetensors.safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors


def official_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The official fixture's model, loaded from its state dict and moved to ``dtype``."""
    config, tensors = fixture(name)
    cls = {"dit_tiny": DiT, "mdtv2_tiny": MDTv2}[name]
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    model = load_official_state_dict(cls(**config), state).eval()
    return (model.double() if dtype == torch.float64 else model), tensors


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Replace every parameter by N(0, std) so no path is switched off by adaLN-Zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(b: int = 4, size: int = 8, num_classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    return x, t, y


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


# --------------------------------------------------------------------------------------------
# Parity with the official model code
# --------------------------------------------------------------------------------------------


# The CFG call each fixture was made with (its metadata says the same).
FIXTURE_CFG = {
    "dit_tiny": {"cfg_scale": 4.0},
    "mdtv2_tiny": {"cfg_scale": 3.8, "diffusion_steps": 1000, "scale_pow": 4.0},
}


def parity_results(model: nn.Module, ref: dict[str, torch.Tensor], name: str, **cfg_overrides) -> dict:
    """What parity compares: outputs, CFG outputs and the maps of both captures, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    x, t, y = ref["input.x"].to(dtype), ref["input.t"], ref["input.y"]
    with torch.no_grad():
        out = model(x, t, y)
        cfg_x = ref["cfg_input.x"].to(dtype)
        cfg = model.forward_with_cfg(cfg_x, ref["cfg_input.t"], ref["cfg_input.y"], **{**FIXTURE_CFG[name], **cfg_overrides})
        with capture_attention(model) as store:
            captured_out = model(x, t, y)
        with capture_qk(model) as qk:
            model(x, t, y)
    # capture_qk records what enters the softmax; its maps are recomputed as SHD does.
    qk_maps = [attention_probs(q, k, q.shape[-1] ** -0.5, bias) for q, k, bias in zip(qk.queries, qk.keys, qk.biases)]
    return {"out": out, "captured_out": captured_out, "cfg": cfg, "maps": store.maps, "qk_maps": qk_maps}


def parity_errors(got: dict, ref: dict[str, torch.Tensor], suffix: str) -> dict[str, float]:
    """Largest errors against the fixture's keys (``suffix`` "64" for the float64 references)."""
    map_keys = sorted(k for k in ref if k.startswith(f"attention_maps{suffix}."))
    assert len(got["maps"]) == len(got["qk_maps"]) == len(map_keys)
    errors = {
        "out": rel_err(got["out"], ref[f"output{suffix}.eps_sigma"]),
        "captured_out": rel_err(got["captured_out"], ref[f"output{suffix}.eps_sigma"]),
        "cfg": rel_err(got["cfg"], ref[f"cfg_output{suffix}"]),
    }
    for kind in ("maps", "qk_maps"):
        for key, m in zip(map_keys, got[kind]):
            assert m.shape == ref[key].shape, key
        errors[kind] = max((m - ref[k]).abs().max().item() for k, m in zip(map_keys, got[kind]))
    return errors


@pytest.mark.parametrize("name", ["dit_tiny", "mdtv2_tiny"])
def test_official_parity_float64(name: str) -> None:
    model, ref = official_model(name, torch.float64)
    got = parity_results(model, ref, name)
    for kind in ("out", "captured_out", "cfg", "maps", "qk_maps"):
        values = got[kind] if isinstance(got[kind], list) else [got[kind]]
        assert all(v.dtype == torch.float64 for v in values), kind  # nothing falls back to float32
    assert len(got["maps"]) == len(model.attention_layers())
    errors = parity_errors(got, ref, "64")
    assert max(errors.values()) < PARITY64_TOL, errors


@pytest.mark.parametrize("name", ["dit_tiny", "mdtv2_tiny"])
def test_official_parity_float32(name: str) -> None:
    model, ref = official_model(name)
    got = parity_results(model, ref, name)
    assert all(m.dtype == torch.float32 for m in got["maps"] + got["qk_maps"]) and got["cfg"].dtype == torch.float32
    errors = parity_errors(got, ref, "")
    assert max(errors["out"], errors["captured_out"], errors["cfg"]) < OUT_RTOL, errors
    assert max(errors["maps"], errors["qk_maps"]) < MAP_ATOL, errors


def _layernorm_eps(model: nn.Module, eps: float) -> dict:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return {}


def _frequency_shift(model: nn.Module) -> dict:
    model.t_embedder.freq_shift = 1
    return {}


WRONG_CONSTANTS = {
    "layernorm_eps_1e-5": lambda model: _layernorm_eps(model, 1e-5),
    "timestep_freq_shift_1": _frequency_shift,
    "four_guided_channels": lambda model: {"guidance_channels": 4},
}


@pytest.mark.parametrize("mistake", sorted(WRONG_CONSTANTS))
@pytest.mark.parametrize("name", ["dit_tiny", "mdtv2_tiny"])
def test_float64_parity_catches_wrong_constants(name: str, mistake: str) -> None:
    # The mistakes float32 parity cannot see on every CPU (they move results by ~2e-6): in float64
    # each misses the references by at least four orders of magnitude more than PARITY64_TOL.
    model, ref = official_model(name, torch.float64)
    cfg_overrides = WRONG_CONSTANTS[mistake](model)
    errors = parity_errors(parity_results(model, ref, name, **cfg_overrides), ref, "64")
    assert max(errors.values()) > 1e4 * PARITY64_TOL, errors


@pytest.mark.parametrize("name", ["dit_tiny", "mdtv2_tiny"])
def test_cfg_all_channels_option(name: str) -> None:
    model, ref = official_model(name)
    x, t, y = ref["cfg_input.x"], ref["cfg_input.t"], ref["cfg_input.y"]
    assert (y[2:] == model.null_class).all()
    with torch.no_grad():
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
        guided = model.forward_with_cfg(x, t, y, cfg_scale=3.0, guidance_channels=None)
    scale = torch.full((2,), 3.0) if name == "dit_tiny" else power_cosine_cfg_scale(t[:2], 3.0)
    cond, uncond = raw[:2, :4], raw[2:, :4]
    expect = uncond + scale.view(-1, 1, 1, 1) * (cond - uncond)
    torch.testing.assert_close(guided[:2, :4], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[2:, :4], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, 4:], raw[:, 4:])  # variance channels pass through


def test_power_cosine_schedule() -> None:
    t = torch.tensor([0, 250, 500, 999])
    got = power_cosine_cfg_scale(t, 3.8, diffusion_steps=1000, scale_pow=4.0)
    expect = [(3.8 - 1) * (1 - math.cos(math.pi * (1 - s / 1000) ** 4)) / 2 + 1 for s in t.tolist()]
    torch.testing.assert_close(got, torch.tensor(expect), atol=1e-6, rtol=0)
    assert got[0] == pytest.approx(3.8) and got[-1] == pytest.approx(1.0, abs=1e-6)


def test_relative_position_index_matches_official() -> None:
    _, ref = fixture("mdtv2_tiny")
    model = MDTv2(**TINY_MDT)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref[f"state_dict.{name}"]), name


def test_sincos_pos_embed_brute_force() -> None:
    model = DiT(**TINY_DIT)
    d, g = 64, 4
    pos = model.pos_embed[0]  # (N, D)
    for n in range(g * g):
        row, col = divmod(n, g)
        for i in range(d // 4):
            omega = 1.0 / 10000 ** (i / (d // 4))
            # first half encodes the column, second half the row; each half is [sin | cos]
            expect = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
            got = [pos[n, i], pos[n, d // 4 + i], pos[n, d // 2 + i], pos[n, 3 * d // 4 + i]]
            assert [float(v) for v in got] == pytest.approx(expect, abs=1e-6)


def test_fixture_missing_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_FIXTURES, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        fixture("no_such_fixture")
    monkeypatch.setenv(REQUIRE_FIXTURES, "1")
    with pytest.raises(pytest.fail.Exception, match="not found"):
        fixture("no_such_fixture")


def _blocks(model: nn.Module) -> list[AdaLNZeroBlock]:
    return [m for m in model.modules() if isinstance(m, AdaLNZeroBlock)]


@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT)])
def test_layers_match_upstream_structure(cls: type, config: dict) -> None:
    # Details named outright, although parity catches most of them: a 1e-5 LayerNorm eps, an
    # affine LayerNorm (upstream has none, so the official state dicts hold no norm weights),
    # exact-erf GELU.
    model = cls(**config)
    blocks = _blocks(model)
    assert len(blocks) == config["depth"] + (1 if cls is MDTv2 else 0)  # + MDT's side block
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * len(blocks) + 1  # norm1, norm2 per block; final_layer.norm_final
    assert {id(n) for n in norms} == {id(b.norm1) for b in blocks} | {id(b.norm2) for b in blocks} | {
        id(model.final_layer.norm_final)
    }
    for norm in norms:
        assert norm.eps == 1e-6 and not norm.elementwise_affine
        assert norm.weight is None and norm.bias is None
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == len(blocks) and all(g.approximate == "tanh" for g in gelus)
    assert all(isinstance(b.mlp, Mlp) and b.mlp.act.approximate == "tanh" for b in blocks)
    assert all(b.mlp.fc1.out_features == 4 * config["hidden_size"] for b in blocks)
    for ada in [b.adaLN_modulation for b in blocks] + [model.final_layer.adaLN_modulation]:
        assert isinstance(ada[0], nn.SiLU) and len(ada) == 2
    for b in blocks:
        assert b.attn.scale == (config["hidden_size"] // config["num_heads"]) ** -0.5
    assert model.t_embedder.frequency_embedding_size == model.t_embedder.mlp[0].in_features == 256
    assert isinstance(model.t_embedder.mlp[1], nn.SiLU)
    # Nothing else computes: every leaf module is one of upstream's kinds.
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert leaves <= {nn.Conv2d, nn.Linear, nn.LayerNorm, nn.GELU, nn.SiLU, nn.Embedding, RelativePositionBias}



@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT), (MDTv2, dict(TINY_MDT, mask_ratio=None))])
def test_initial_weights_follow_upstream_init(cls: type, config: dict) -> None:
    # One init for both families (DiffusionTransformerBase.initialize_weights); MDT adds its own.
    torch.manual_seed(0)
    model = cls(**config)
    zero = [m.adaLN_modulation[-1] for m in _blocks(model)] + [model.final_layer.adaLN_modulation[-1]]
    zero.append(model.final_layer.linear)
    for layer in zero:  # adaLN-Zero: every block is the identity and the output is 0
        assert (layer.weight == 0).all() and (layer.bias == 0).all()
    zeroed = {id(layer) for layer in zero}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in zeroed and m not in model.t_embedder.mlp:
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))  # xavier-uniform limit
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert (m.bias == 0).all()
    w = model.x_embedder.proj.weight  # (D, C, p, p), initialised as a (D, C*p*p) linear map
    assert w.abs().max() <= math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
    # Upstream MDT zeroes the patch conv's bias; upstream DiT keeps the conv default.
    assert (model.x_embedder.proj.bias == 0).all() == (cls is MDTv2)
    for weight in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert (model.t_embedder.mlp[0].bias == 0).all() and (model.t_embedder.mlp[2].bias == 0).all()
    grid = config["input_size"] // config["patch_size"]
    pos = get_2d_sincos_pos_embed(config["hidden_size"], grid).unsqueeze(0)  # (1, N, D)
    assert torch.equal(model.pos_embed.data, pos)
    if cls is MDTv2:
        assert torch.equal(model.decoder_pos_embed.data, pos)
        if config["mask_ratio"] is None:
            assert (model.mask_token == 0).all() and not model.mask_token.requires_grad
        else:
            assert abs(model.mask_token.std().item() - 0.02) < 0.01 and model.mask_token.requires_grad
    torch.manual_seed(0)
    again = cls(**config)  # the same seed gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_timestep_embedding_layout() -> None:
    # GLIDE/ADM layout as upstream: [cos(t f_i) | sin(t f_i)], f_i = 10000^(-i/half), zero pad.
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)  # default max_period must be 10000
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)  # (half,)
    args = t.double()[:, None] * freqs[None]  # (4, half)
    # float32 frequencies times t <= 999 leave ~1e-4 rad of rounding in the arguments.
    torch.testing.assert_close(emb[:, :half].double(), args.cos(), atol=2e-4, rtol=0)
    torch.testing.assert_close(emb[:, half:].double(), args.sin(), atol=2e-4, rtol=0)
    assert (emb[0, :half] == 1).all() and (emb[0, half:] == 0).all()  # t = 0: cos first, then sin
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0), abs=1e-7)  # f_0 = 1
    assert emb[1, half].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert emb[1, half - 1].item() == pytest.approx(math.cos(10000.0 ** (-(half - 1) / half)), abs=1e-7)
    # float64 (a model moved with .double()): the same features to float64 rounding.
    emb64 = TimestepEmbedder.timestep_embedding(t, 256, dtype=torch.float64)
    assert emb64.dtype == torch.float64
    torch.testing.assert_close(emb64, torch.cat([args.cos(), args.sin()], dim=1), atol=1e-12, rtol=0)
    odd = TimestepEmbedder.timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and (odd[:, -1] == 0).all()
    torch.testing.assert_close(odd[:, :6], TimestepEmbedder.timestep_embedding(t, 6))


# --------------------------------------------------------------------------------------------
# Loading official checkpoints
# --------------------------------------------------------------------------------------------


def official_like_state(cls: type, **config) -> dict[str, torch.Tensor]:
    """A state dict in the official layout (key names are proven by the parity test)."""
    return randomize_(cls(**config)).state_dict()


def test_load_errors_name_the_keys() -> None:
    state = official_like_state(MDTv2, **TINY_MDT)
    model = MDTv2(**TINY_MDT)

    dropped = dict(state)
    del dropped["de_blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"missing keys 1: de_blocks\.1\.attn\.qkv\.bias"):
        load_official_state_dict(model, dropped)

    added = dict(state, **{"extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys 1: extra\.weight"):
        load_official_state_dict(model, added)

    reshaped = dict(state, mask_token=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match=r"mask_token \(checkpoint \(1, 2, 64\) vs model \(1, 1, 64\)\)"):
        load_official_state_dict(model, reshaped)

    # Many offenders: the first few and a count.
    truncated = {k: v for k, v in state.items() if not k.startswith("en_")}
    with pytest.raises(ValueError, match=r"missing keys \d+: .*\.\.\. \(\d+ more\)"):
        load_official_state_dict(model, truncated)


def test_load_error_wrong_decode_layer() -> None:
    state = official_like_state(MDTv2, **TINY_MDT)  # decode_layer=2
    model = MDTv2(**dict(TINY_MDT, decode_layer=4))
    with pytest.raises(ValueError, match=r"checkpoint has decode_layer=2 .* built with decode_layer=4") as err:
        load_official_state_dict(model, state)
    assert "de_blocks.2" in str(err.value) and "en_inblocks.1" in str(err.value)


def test_load_error_names_fitting_registry_config() -> None:
    with torch.device("meta"):
        small, base = create_model("MDTv2-S/2", decode_layer=2), create_model("MDTv2-B/2")
        dit_small, dit_base = create_model("DiT-S/2"), create_model("DiT-B/2")
    assert infer_architecture(small.state_dict())["num_heads"] == 6
    with pytest.raises(ValueError, match=r"fits create_model\('MDTv2-S/2', decode_layer=2\)"):
        load_official_state_dict(base, small.state_dict())
    with pytest.raises(ValueError, match=r"num_heads cannot be read off.*fits create_model\('DiT-S/2'\)"):
        load_official_state_dict(dit_base, dit_small.state_dict())


def test_load_accepts_wrappers() -> None:
    ema = official_like_state(DiT, **TINY_DIT)
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    model = DiT(**TINY_DIT)
    for ckpt in (
        {"ema": ema, "model": raw, "opt": {}, "args": argparse.Namespace(lr=1e-4)},
        {"model": ema},
        {f"module.{k}": v for k, v in ema.items()},
        {"ema": {f"module.{k}": v for k, v in ema.items()}},
    ):
        nn.init.zeros_(model.final_layer.linear.weight)
        load_official_state_dict(model, ckpt)
        assert torch.equal(model.final_layer.linear.weight, ema["final_layer.linear.weight"])


def test_load_checkpoint_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = official_like_state(DiT, **TINY_DIT)
    with pytest.raises(FileNotFoundError):
        load_checkpoint_file(tmp_path / "nope.pt")

    torch.save({"ema": state, "args": argparse.Namespace(model="DiT-S/2")}, tmp_path / "train.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("train.pt", "w.safetensors"):
        model = load_official_state_dict(DiT(**TINY_DIT), load_checkpoint_file(tmp_path / name))
        assert torch.equal(model.pos_embed, state["pos_embed"])

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        load_checkpoint_file(tmp_path / "list.pt")
    torch.save({"step": 3, "note": "x"}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="not a tensor dict.*'step'"):
        load_checkpoint_file(tmp_path / "meta.pt")
    torch.save({"ema": state, "cfg": TinyConfig()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_checkpoint_file(tmp_path / "pickled.pt")


class TinyConfig:
    """An arbitrary pickled object: weights_only loading must refuse it."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides, millions",
    [
        ("DiT-S/2", {}, 33.0),
        ("DiT-B/2", {}, 130.5),
        ("DiT-XL/2", {}, 675.1),
        # 37.9M is MDTv2-S/2 with decode_layer=2; each extra decoder block adds a skip_linear.
        ("MDTv2-S/2", {"decode_layer": 2}, 37.9),
        ("MDTv2-S/2", {}, 38.5),
    ],
)
def test_registry_param_counts(name: str, overrides: dict, millions: float) -> None:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_registry_builds_every_name() -> None:
    assert len(MODEL_NAMES) == 16
    for name in MODEL_NAMES:
        with torch.device("meta"):
            model = create_model(name)
        assert isinstance(model, MDTv2 if name.startswith("MDTv2") else DiT)
        assert model.config.patch_size == int(name.rsplit("/", 1)[1])
        assert len(model.attention_layers()) == model.config.depth
    with torch.device("meta"):
        assert create_model("MDTv2-S/2").decode_layer == 6
        assert create_model("MDTv2-XL/2").decode_layer == 4
    with pytest.raises(ValueError, match=r"did you mean 'DiT-XL/2'.*valid names: DiT-S/2"):
        create_model("DiT-XL2")


# --------------------------------------------------------------------------------------------
# Model behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT)])
def test_save_pretrained_round_trip(cls: type, config: dict, tmp_path: Path) -> None:
    model = randomize_(cls(**config)).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT)])
def test_sdpa_path_equals_capture_path(cls: type, config: dict) -> None:
    model = randomize_(cls(**config)).eval()
    x, t, y = batch()
    with torch.no_grad():
        fast = model(x, t, y)
        fast_again = model(x, t, y)
        with capture_attention(model) as store:
            slow = model(x, t, y)
    assert torch.equal(fast, fast_again)  # the unmasked pass is deterministic
    assert (fast - slow).abs().max().item() < PATH_ATOL
    assert all(isinstance(a.processor, SDPAProcessor) for a in model.attention_layers())  # restored
    assert all(m.shape == (4, 4, 16, 16) for m in store.maps)


@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT)])
def test_bf16_autocast_forward(cls: type, config: dict) -> None:
    model = randomize_(cls(**config)).eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = model(x, t, y)
        with capture_attention(model) as ref_maps:
            model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
            with capture_attention(model) as maps:
                model(x, t, y)
            if cls is MDTv2:
                masked = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(0))
                assert torch.isfinite(masked).all()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 0.05
    # Maps are float32 softmaxes of the bf16 projections (measured max difference 4e-4).
    assert all(m.dtype == torch.float32 for m in maps.maps)
    for got, want in zip(maps.maps, ref_maps.maps):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=0)


def test_label_embedding_null_class_and_dropout() -> None:
    model = randomize_(DiT(**TINY_DIT))
    assert model.null_class == 10 and model.y_embedder.embedding_table.num_embeddings == 11
    emb = model.y_embedder
    labels = torch.arange(8)
    forced = emb.token_drop(labels, force_drop_ids=torch.tensor([1, 0] * 4))
    assert forced.tolist() == [10, 1, 10, 3, 10, 5, 10, 7]
    big = torch.zeros(4000, dtype=torch.long)
    a = emb.token_drop(big, generator=torch.Generator().manual_seed(3))
    b = emb.token_drop(big, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 0.08 < (a == 10).float().mean().item() < 0.12
    # Train mode drops labels (reproducibly with a generator); eval mode never does.
    x, t, y = batch()
    model.train()
    out1 = model(x, t, y, generator=torch.Generator().manual_seed(5))
    out2 = model(x, t, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2)
    model.eval()
    with torch.no_grad():
        uncond = model(x, t, torch.full_like(y, model.null_class))
        assert torch.equal(model(x, t, y, force_drop_ids=torch.ones_like(y)), uncond)


def test_random_masking_and_gathered_bias() -> None:
    x = torch.randn(3, 16, 8)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    kept, mask, ids_restore, ids_keep = random_masking(x, 10, noise)
    assert kept.shape == (3, 10, 8) and (mask.sum(1) == 6).all()
    for b in range(3):
        assert torch.equal(kept[b], x[b, ids_keep[b]])
        assert mask[b, ids_keep[b]].sum() == 0
        assert torch.equal(noise[b].argsort()[ids_restore[b]], torch.arange(16))
    attn = MDTv2(**TINY_MDT).en_inblocks[0].attn
    full = attn.attention_bias()[0]  # (H, N, N)
    gathered = attn.attention_bias(ids_keep)  # (B, H, K, K)
    for b in range(3):
        for i, qi in enumerate(ids_keep[b].tolist()):
            for j, kj in enumerate(ids_keep[b].tolist()):
                assert torch.equal(gathered[b, :, i, j], full[:, qi, kj])


def test_mdt_masked_forward() -> None:
    model = randomize_(MDTv2(**TINY_MDT)).train()
    x, t, y = batch()

    def run(seed: int) -> torch.Tensor:
        return model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 8, 8, 8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with torch.no_grad():
        assert not torch.allclose(a, model(x, t, y, generator=torch.Generator().manual_seed(0)))

    # Capture during the masked pass: only attention_layers() switch; the sideblock stays fast.
    side = model.sideblocks[0].attn
    seen = []
    original = side.processor
    side.set_processor(lambda attn, h, **kw: seen.append(type(original).__name__) or original(attn, h, **kw))
    try:
        with capture_attention(model) as store:
            run(0)
    finally:
        side.set_processor(original)
    assert seen == ["SDPAProcessor"]
    assert len(store.maps) == len(model.attention_layers()) == 6
    n_enc = 2 * model.half_depth
    keep = store.maps[0].shape[-1]
    assert 16 * (1 - 0.3 - 0.2) - 1 <= keep <= 16 * (1 - 0.3)
    assert all(m.shape == (4, 4, keep, keep) for m in store.maps[:n_enc])
    assert all(m.shape == (4, 4, 16, 16) for m in store.maps[n_enc:])

    with pytest.raises(ValueError, match="mask_ratio"):
        MDTv2(**dict(TINY_MDT, mask_ratio=None))(x, t, y, enable_mask=True)


@pytest.mark.parametrize("cls, config", [(DiT, TINY_DIT), (MDTv2, TINY_MDT)])
def test_gradient_checkpointing_same_gradients(cls: type, config: dict) -> None:
    model = randomize_(cls(**config)).train()
    x, t, y = batch()
    kwargs = {"enable_mask": True} if cls is MDTv2 else {}

    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        with capture_attention(model, layers=[0, -1]) as store:
            out = model(x, t, y, generator=torch.Generator().manual_seed(0), **kwargs)
            # A distillation-like loss also backpropagates through the captured maps.
            loss = out.square().mean() + sum(m.square().mean() for m in store.maps)
            loss.backward()
            count = len(store.maps)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], count

    plain, n_plain = grads(False)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt, n_ckpt = grads(True)
    assert n_plain == n_ckpt == 2  # recomputation in backward does not append maps again
    assert len(plain) == len(ckpt)
    for g0, g1 in zip(plain, ckpt):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "cls, config, kwargs",
    [(DiT, TINY_DIT, {}), (MDTv2, TINY_MDT, {}), (MDTv2, TINY_MDT, {"enable_mask": True})],
    ids=["dit", "mdt", "mdt-masked"],
)
def test_sdpa_path_and_capture_path_same_gradients(cls: type, config: dict, kwargs: dict) -> None:
    # Fused SDPA (bias passed as attn_mask) vs explicit softmax: same .grad for every parameter,
    # the relative-position tables included (gathered to the kept tokens in the masked pass).
    model = randomize_(cls(**config)).train()
    x, t, y = batch()

    def grads(capture: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with capture_attention(model) if capture else contextlib.nullcontext():
            out = model(x, t, y, generator=torch.Generator().manual_seed(0), **kwargs)
            out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, slow = grads(False), grads(True)
    assert fast.keys() == slow.keys()
    tables = [n for n in fast if n.endswith("relative_position_bias_table")]
    if cls is MDTv2:
        assert len(tables) == len(model.attention_layers()) + int("enable_mask" in kwargs)  # + side block
        assert all(fast[n].abs().sum() > 0 for n in tables)
    for name in fast:
        torch.testing.assert_close(slow[name], fast[name], atol=GRAD_ATOL, rtol=1e-5, msg=name)


def _reference_block(blk: AdaLNZeroBlock, x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor,
                     skip: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream ``MDTBlock.forward`` written out with the block's weights (explicit attention)."""
    if skip is not None:
        x = blk.skip_linear(torch.cat([x, skip], dim=-1))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
    h = blk.norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]  # (B, K, D)
    b, k, d = h.shape
    heads = blk.attn.heads
    q, kk, v = blk.attn.qkv(h).reshape(b, k, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (B, H, K, d) each
    logits = q @ kk.transpose(-2, -1) * blk.attn.scale + bias  # (B, H, K, K)
    a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, k, d)  # (B, K, D)
    x = x + gate_msa[:, None] * blk.attn.proj(a)
    h = blk.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp[:, None] * blk.mlp(h)


def _upstream_masked_bias(attn: nn.Module, ids_keep: torch.Tensor) -> torch.Tensor:
    """Upstream ``get_masked_rel_bias``: gather the (H, N, N) bias rows, then columns, to (B, H, K, K)."""
    full = attn.rel_pos_bias()  # (H, N, N)
    b, k = ids_keep.shape
    h, n, _ = full.shape
    full = full.unsqueeze(0).expand(b, h, n, n)  # (B, H, N, N)
    rows = torch.gather(full, 2, ids_keep[:, None, :, None].expand(b, h, k, n))  # (B, H, K, N)
    return torch.gather(rows, 3, ids_keep[:, None, None, :].expand(b, h, k, k))  # (B, H, K, K)


def test_mdt_masked_pass_equals_upstream_steps() -> None:
    model = randomize_(MDTv2(**TINY_MDT)).train()
    x, t, y = batch(b=8)
    seed = 14  # drops 2 of the 8 labels, keeps 10 of 16 tokens
    with torch.no_grad():
        got = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(seed))

        # The generator feeds, in order: label dropout (B), the batch's mask-ratio jitter (1),
        # the per-token noise (B, N) whose argsort picks the kept tokens.
        g = torch.Generator().manual_seed(seed)
        drop = torch.rand(len(y), generator=g) < model.y_embedder.dropout_prob
        labels = torch.where(drop, model.null_class, y)
        ratio = model.mask_ratio + 0.2 * torch.rand(1, generator=g).item()
        n, d = model.pos_embed.shape[1:]
        num_keep = int(n * (1 - ratio))
        noise = torch.rand(len(y), n, generator=g)  # (B, N)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :num_keep]  # (B, K)
        mask = torch.ones(len(y), n)
        mask[:, :num_keep] = 0
        mask = mask.gather(1, ids_restore)  # (B, N), 1 = masked

        x_in = model.x_embedder(x) + model.pos_embed  # (B, N, D)
        c = model.t_embedder(t) + model.y_embedder.embedding_table(labels)  # (B, D)
        h = x_in.gather(1, ids_keep[:, :, None].expand(-1, -1, d))  # (B, K, D)
        skips = []
        for blk in model.en_inblocks:
            h = _reference_block(blk, h, c, _upstream_masked_bias(blk.attn, ids_keep))
            skips.append(h)
        for blk in model.en_outblocks:
            h = _reference_block(blk, h, c, _upstream_masked_bias(blk.attn, ids_keep), skip=skips.pop())
        # Side-interpolater: re-insert mask tokens, unshuffle, add decoder_pos_embed, side block,
        # keep its output only at the masked positions.
        fill = model.mask_token.repeat(len(y), n - num_keep, 1)  # (B, N-K, D)
        h = torch.cat([h, fill], dim=1).gather(1, ids_restore[:, :, None].expand(-1, -1, d))  # (B, N, D)
        h = h + model.decoder_pos_embed
        side = _reference_block(model.sideblocks[0], h, c, model.sideblocks[0].attn.rel_pos_bias()[None])
        h = side * mask[:, :, None] + (1 - mask[:, :, None]) * h
        for blk in model.de_blocks:
            h = _reference_block(blk, h, c, blk.attn.rel_pos_bias()[None], skip=x_in)
        h = model.final_layer(h, c)  # (B, N, p*p*C_out)
        g_side, p = 4, 2
        h = h.reshape(len(y), g_side, g_side, p, p, 8)
        expect = torch.einsum("nhwpqc->nchpwq", h).reshape(len(y), 8, 8, 8)  # upstream unpatchify

    assert drop.any() and 0 < num_keep < n
    # Measured 2e-7: the two differ only in SDPA vs explicit softmax.
    assert rel_err(got, expect) < PATH_ATOL


def test_guided_output_mixes_in_float32_under_autocast() -> None:
    # cond = 1, uncond = 0: the guided eps is the scale itself. In bf16, 3.8 becomes 3.796875.
    out = torch.cat([torch.ones(2, 8, 2, 2), torch.zeros(2, 8, 2, 2)]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for scale in (3.8, torch.tensor([3.8, 3.8])):
            guided = guided_output(out, scale, eps_channels=4, guidance_channels=3)
            assert guided.dtype == torch.float32
            assert (guided[:, :3] == torch.tensor(3.8)).all()
            assert torch.equal(guided[:, 3:], out[:, 3:].float())

    model = randomize_(MDTv2(**TINY_MDT)).eval()
    x, t, y = batch()
    y = torch.cat([y[:2], torch.full((2,), model.null_class)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model(torch.cat([x[:2], x[:2]]), t, y).float()  # bf16 output, upcast exactly
        guided = model.forward_with_cfg(x, t, y, cfg_scale=3.8)
    scale = power_cosine_cfg_scale(t[:2], 3.8).view(-1, 1, 1, 1)  # float32
    expect = raw[2:, :3] + scale * (raw[:2, :3] - raw[2:, :3])
    assert guided.dtype == torch.float32
    torch.testing.assert_close(guided[:2, :3], expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(guided[2:, :3], expect, atol=1e-6, rtol=0)


def test_mdt_forward_with_cfg_without_scale_is_plain_forward() -> None:
    # Upstream signature: forward_with_cfg(x, t, y, cfg_scale=None, diffusion_steps=1000, scale_pow=4.0);
    # None skips guidance and the first-half pairing.
    model = randomize_(MDTv2(**TINY_MDT)).eval()
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(model.forward_with_cfg(x, t, y), model(x, t, y))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.slow
def test_torch_compile_matches_eager(checkpointing: bool) -> None:
    # What the trainer does with train.compile: module.compile() in place, then normal calls,
    # attention capture included (capture + checkpointing graph-breaks at capturing blocks).
    # The smallest MDT with every block kind (in, out, decoder): compiling costs seconds per graph.
    torch._dynamo.reset()
    config = dict(TINY_MDT, hidden_size=32, num_heads=2, depth=3, decode_layer=1)
    eager = randomize_(MDTv2(**config)).train()
    compiled = randomize_(MDTv2(**config)).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="eager")
    x, t, y = batch()
    drop = torch.tensor([0, 1, 0, 0])

    def step(model: nn.Module, capture: bool, masked: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        with capture_attention(model, layers=[0, -1]) if capture else contextlib.nullcontext() as store:
            kwargs = {"enable_mask": True, "generator": torch.Generator().manual_seed(3)} if masked else {}
            out = model(x, t, y, force_drop_ids=drop, **kwargs)
            loss = out.square().mean() + sum(m.square().mean() for m in (store.maps if capture else []))
            loss.backward()
            count = len(store.maps) if capture else 0
        return out.detach(), [p.grad for p in model.parameters() if p.grad is not None], count

    # The masked pass (data-dependent token count: graph breaks) runs without checkpointing only,
    # to keep this test at a few seconds; eager checkpointing of it is tested above.
    cases = [(False, False), (True, False)] + ([] if checkpointing else [(False, True)])
    for capture, masked in cases:
        ref_out, ref_grads, ref_count = step(eager, capture, masked)
        out, grads, count = step(compiled, capture, masked)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
        assert count == ref_count == (2 if capture else 0)  # no maps appended twice
        assert len(grads) == len(ref_grads)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)


def _inspect_checkpoint_main():
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", REPO / "scripts" / "inspect_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_inspect_checkpoint_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _inspect_checkpoint_main()
    # DiT-S/2 widths on an 8x8 latent; every tensor a stride-0 view of one zero, so the file
    # holds one value per tensor instead of 33M.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model("DiT-S/2", input_size=8).state_dict().items()}
    path = tmp_path / "dit_s2.pt"
    torch.save({"ema": {k: torch.zeros(()).expand(s) for k, s in shapes.items()}, "steps": torch.tensor(5)}, path)

    assert main([str(path), "--model", "DiT-S/4", "--input-size", "8"]) == 1
    text = capsys.readouterr().out
    assert "does not load into DiT-S/4" in text and "x_embedder.proj.weight" in text
    assert "fits create_model('DiT-S/2', input_size=8)" in text

    assert main([str(path), "--model", "DiT-S/2", "--input-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "weights from the 'ema' entry" in text and "loads strictly into DiT-S/2, input_size=8" in text

    # A NaN is what sampling, export and training refuse: the inspection says so, naming the tensor.
    ema = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    ema["blocks.1.attn.qkv.bias"] = torch.full(shapes["blocks.1.attn.qkv.bias"], float("nan"))
    torch.save({"ema": ema}, path)
    assert main([str(path), "--model", "DiT-S/2", "--input-size", "8"]) == 1
    text = capsys.readouterr().out
    assert "unusable" in text and "non-finite" in text and "blocks.1.attn.qkv.bias" in text
    assert "loads strictly" not in text
