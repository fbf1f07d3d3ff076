"""Kernel-level q/k capture of diffusers' text-to-image transformers (shd_diffusion.t2i_capture).

Tiny random models of diffusers' own classes (PixArt, SD3 with a dual-attention layer, FLUX.1,
FLUX.2, Qwen-Image with a padded caption); exactness checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shd_diffusion.attention import capture_qk
from shd_diffusion.shd import apply_alphas, default_groups, shd_loss, shd_term, squeeze_heads
from shd_diffusion.t2i_capture import _CALLER, capture_t2i_qk, shd_inputs, t2i_attention_layers

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_dispatch import _AttentionBackendRegistry  # noqa: E402

B, TEXT, GRID = 2, 5, 4  # batch, caption tokens, latent grid side (16 image tokens)
IMAGE = GRID * GRID
# float64 rebuild of a module's output from the captured q, k, v: summation order only (measured <= 1e-15).
REBUILD_ATOL = 1e-12


def _caption_mask() -> torch.Tensor:
    """(B, TEXT) 1 = real token: sample 0 has two padded caption tokens at the end."""
    mask = torch.ones(B, TEXT, dtype=torch.long)
    mask[0, 3:] = 0
    return mask


def _pixart(heads: int = 4):
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=1, cross_attention_dim=heads * 8, sample_size=2 * GRID, patch_size=2, caption_channels=16,
        use_additional_conditions=False)
    inputs = dict(hidden_states=torch.randn(B, 4, 2 * GRID, 2 * GRID), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  encoder_attention_mask=_caption_mask().float())
    return model, inputs


def _sd3(heads: int = 4):
    model = diffusers.SD3Transformer2DModel(
        sample_size=2 * GRID, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=heads,
        joint_attention_dim=16, caption_projection_dim=heads * 8, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=2 * GRID, dual_attention_layers=(0,), qk_norm="rms_norm")
    inputs = dict(hidden_states=torch.randn(B, 4, 2 * GRID, 2 * GRID), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  pooled_projections=torch.randn(B, 8), timestep=torch.tensor([10.0, 500.0]))
    return model, inputs


def _grid_ids(axes: int) -> torch.Tensor:
    ids = torch.zeros(IMAGE, axes)  # (N, axes): position ids (frame, row, column[, ...])
    ids[:, 1], ids[:, 2] = torch.arange(IMAGE) // GRID, torch.arange(IMAGE) % GRID
    return ids


def _flux(heads: int = 4):
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=heads,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    inputs = dict(hidden_states=torch.randn(B, IMAGE, 8), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  pooled_projections=torch.randn(B, 8), timestep=torch.tensor([0.1, 0.5]), img_ids=_grid_ids(3),
                  txt_ids=torch.zeros(TEXT, 3))
    return model, inputs


def _flux2(heads: int = 4):
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=heads,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    inputs = dict(hidden_states=torch.randn(B, IMAGE, 8), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  timestep=torch.tensor([0.1, 0.5]), img_ids=_grid_ids(4), txt_ids=torch.zeros(TEXT, 4))
    return model, inputs


def _qwen(heads: int = 4):
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=heads,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    inputs = dict(hidden_states=torch.randn(B, IMAGE, 16), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  encoder_hidden_states_mask=_caption_mask(), timestep=torch.tensor([0.1, 0.5]),
                  img_shapes=[[(1, GRID, GRID)]] * B)
    return model, inputs


FAMILIES = {"pixart": _pixart, "sd3": _sd3, "flux": _flux, "flux2": _flux2, "qwen": _qwen}
# Self/joint layers of each tiny model, in execution order: (query rows, key rows) per layer.
LAYOUT = {
    "pixart": [(IMAGE, IMAGE)] * 2,
    "sd3": [(IMAGE + TEXT,) * 2, (IMAGE, IMAGE), (IMAGE + TEXT,) * 2],  # block 0: joint, then dual attn2
    "flux": [(IMAGE + TEXT,) * 2] * 2,
    "flux2": [(IMAGE + TEXT,) * 2] * 2,
    "qwen": [(IMAGE + TEXT,) * 2] * 2,
}


def _build(family: str, dtype: torch.dtype = torch.float64, heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs = FAMILIES[family](heads)
    cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return model.to(dtype).eval(), cast


def _run(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Oracle: softmax(q k^T / sqrt(d) + bias) in float64, written out."""
    logits = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, S_q, S_k)
    if bias is not None:
        logits = logits + bias.double()
    return logits.softmax(-1)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)  # (B, S, H*d)


# --------------------------------------------------------------------------------- exactness


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_qkv_rebuild_every_module_output_through_the_named_out_projections(family):
    model, inputs = _build(family)
    sites = t2i_attention_layers(model)
    outputs, packed_inputs, handles = [], [], []
    for site in sites:
        handles.append(site.module.register_forward_hook(lambda m, a, out: outputs.append(out)))
        if site.site.packed_out:  # the single-stream Linear that projects cat[attention, mlp]
            linear = site.block.get_submodule(site.site.out[0])
            handles.append(linear.register_forward_hook(lambda m, a, out: packed_inputs.append((m, a[0]))))
    with torch.no_grad(), capture_qk(model, export_values=True) as store:
        _run(model, inputs)
    for h in handles:
        h.remove()
    assert store.layer_indices == list(range(len(sites)))
    assert [(q.shape[-2], k.shape[-2]) for q, k in zip(store.queries, store.keys)] == LAYOUT[family]
    worst = 0.0
    packed = iter(packed_inputs)
    for i, site in enumerate(sites):
        heads_out = _probs(store.queries[i], store.keys[i], store.biases[i]) @ store.values[i]  # (B, H, S, d)
        worst = max(worst, (heads_out - store.outputs[i]).abs().max().item())
        merged = _merge(heads_out)  # (B, S, H*d)
        out = outputs[i]
        if site.site.packed_out:
            linear, x = next(packed)
            attn_part = x.clone()
            attn_part[..., merged.shape[-1]:] = 0  # (B, S, H*d + mlp): the mlp branch removed
            reference = linear(x) - linear(x - attn_part)  # this attention's contribution, bias cancelled
        for seg in store.segments[i]:
            rebuilt = merged[:, seg.rows]  # (B, n_seg, H*d)
            if site.site.packed_out:
                want = reference[:, seg.rows]
                rebuilt = rebuilt @ seg.out_weight.T
            else:
                want = out if not isinstance(out, tuple) else out[0 if seg.name == "image" else 1]
                if seg.out_weight is not None:
                    path = site.site.out[site.site.order.index(seg.name)]
                    rebuilt = F.linear(rebuilt, seg.out_weight, site.block.get_submodule(path).bias)
            assert want.shape == rebuilt.shape
            worst = max(worst, (rebuilt - want).abs().max().item())
    print(f"{family}: max |rebuilt - module output| = {worst:.2e}")
    assert worst <= REBUILD_ATOL


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_and_gradients_bitwise_unchanged_by_the_capture(family):
    model, inputs = _build(family, torch.float32)
    model.train()  # student mode: a graph through the captured tensors
    ref = _run(model, inputs)
    ref.square().mean().backward()
    ref_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with capture_qk(model, layers=[0, -1]) as store:
        out = _run(model, inputs)
    out.square().mean().backward()
    assert torch.equal(out, ref)
    assert all(g is None and p.grad is None or torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads))
    n = len(LAYOUT[family])
    assert store.layer_indices == [0, n - 1] and all(q.requires_grad for q in store.queries)
    with torch.no_grad(), capture_qk(model, export_values=True):
        assert torch.equal(_run(model, inputs), ref.detach())


@pytest.mark.numerics
def test_other_dispatch_backends_are_recorded_once():
    # diffusers' attention_backend() context picks another registered backend; "_native_math" ends in
    # F.sdpa too, which must not give a second entry.
    from diffusers.models.attention_dispatch import attention_backend

    model, inputs = _build("flux")
    with torch.no_grad():
        ref = _run(model, inputs)
        with attention_backend("_native_math"), capture_qk(model, export_values=True) as store:
            out = _run(model, inputs)
    assert torch.equal(out, ref) or (out - ref).abs().max().item() < 1e-12  # another kernel: float64 rounding only
    assert store.layer_indices == [0, 1]
    for q, k, v, o in zip(store.queries, store.keys, store.values, store.outputs):
        assert ((_probs(q, k, None) @ v) - o).abs().max().item() <= REBUILD_ATOL


# --------------------------------------------------------------------------------- layout


@pytest.mark.numerics
def test_layer_numbering_excludes_pixart_cross_attention_unless_asked():
    model, inputs = _build("pixart")
    with torch.no_grad(), capture_qk(model, layers=[-1]) as last:
        _run(model, inputs)
    with torch.no_grad(), capture_t2i_qk(model, export_values=True, cross_attention=True) as every:
        _run(model, inputs)
    assert last.layer_indices == [1] and last.keys[0].shape[-2] == IMAGE
    # With cross-attention: self, cross, self, cross; the cross entries' keys are the caption.
    assert [k.shape[-2] for k in every.keys] == [IMAGE, TEXT, IMAGE, TEXT]
    assert torch.equal(every.queries[2], last.queries[0])  # default layer 1 is the second self-attention
    # PixArt's additive caption mask (-10000 on padded tokens) removes them: exactly zero probability.
    cross = _probs(every.queries[1], every.keys[1], every.biases[1])  # (B, H, IMAGE, TEXT)
    assert cross[0, :, :, 3:].abs().max().item() == 0.0 and cross[0, :, :, :3].min().item() > 0
    assert cross[1].min().item() > 0


@pytest.mark.numerics
def test_padded_caption_keys_get_zero_probability():
    model, inputs = _build("qwen")
    with torch.no_grad(), capture_qk(model, export_values=True) as store:
        _run(model, inputs)
    for q, k, bias in zip(store.queries, store.keys, store.biases):
        assert bias.shape == (B, 1, 1, TEXT + IMAGE)
        probs = _probs(q, k, bias)  # (B, H, S, S), keys [text, image]
        assert probs[0, :, :, 3:TEXT].abs().max().item() == 0.0  # the two padded caption tokens
        assert probs[0, :, :, :3].min().item() > 0 and probs[1].min().item() > 0


@pytest.mark.numerics
def test_explicit_scale_and_gqa_are_folded_into_the_record():
    # A processor passing scale= and 2 KV heads for 4 query heads (Lumina2/Cosmos3 style): the entry
    # still satisfies logits = q k^T / sqrt(d) + bias, with KV head i // 2 repeated as SDPA does.
    model, inputs = _build("sd3")
    q, k, v = torch.randn(B, 4, 6, 8).double(), torch.randn(B, 2, 6, 8).double(), torch.randn(B, 2, 6, 8).double()
    extra = []
    with torch.no_grad(), capture_qk(model, layers=[1], export_values=True) as store:
        # Registered after the capture's own pre-hook, so it runs while layer 1 is the caller.
        handle = model.transformer_blocks[0].attn2.register_forward_pre_hook(
            lambda m, a: extra.append(F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)))
        try:
            _run(model, inputs)
        finally:
            handle.remove()
    assert store.layer_indices == [1, 1]  # the extra call, then attn2's own
    assert store.keys[0].shape == (B, 4, 6, 8)
    rebuilt = _probs(store.queries[0], store.keys[0], store.biases[0]) @ store.values[0]  # (B, H, 6, d)
    assert (rebuilt - extra[0]).abs().max().item() <= REBUILD_ATOL
    wrong = _probs(q, store.keys[0], None) @ store.values[0]  # the scale left out
    assert (wrong - extra[0]).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------- hygiene


def _global_state():
    return F.scaled_dot_product_attention, dict(_AttentionBackendRegistry._backends)


def _assert_clean(model, before):
    sdpa, backends = before
    assert F.scaled_dot_product_attention is sdpa
    assert _AttentionBackendRegistry._backends.keys() == backends.keys()
    assert all(_AttentionBackendRegistry._backends[k] is fn for k, fn in backends.items())
    assert _CALLER.get() is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_no_wrapper_or_hook_left_after_exit_exception_and_nesting():
    model, inputs = _build("flux", torch.float32)
    other, other_inputs = _build("sd3", torch.float32)
    before = _global_state()
    with torch.no_grad(), capture_qk(model):
        assert F.scaled_dot_product_attention is not before[0]  # really wrapped while open
        _run(model, inputs)
    _assert_clean(model, before)
    with pytest.raises(ZeroDivisionError):
        with torch.no_grad(), capture_qk(model):
            _run(model, inputs)
            1 / 0
    _assert_clean(model, before)
    # A failure inside a captured module's forward: its post-hook never runs.
    with pytest.raises(RuntimeError, match="no_grad"):
        with capture_qk(model, export_values=True):
            _run(model, inputs)
    _assert_clean(model, before)
    # Teacher and student captures open together, the first one closed first.
    first, second = capture_qk(model), capture_qk(other)
    with torch.no_grad():
        store, inner = first.__enter__(), second.__enter__()
        _run(other, other_inputs)
        _run(model, inputs)
        first.__exit__(None, None, None)
        _run(other, other_inputs)  # still captured: the wrappers stay until the last capture closes
        second.__exit__(None, None, None)
    assert len(store.queries) == 2 and len(inner.queries) == 6  # each model into its own store
    _assert_clean(model, before)
    _assert_clean(other, before)


@pytest.mark.parametrize("family", ["sd3", "flux"])  # F.sdpa path and dispatch path
def test_activation_checkpointing_does_not_double_records(family):
    def run(checkpointing: bool):
        model, inputs = _build(family, torch.float32, seed=3)
        if checkpointing:
            model.enable_gradient_checkpointing()
        with capture_qk(model) as store:  # backward inside the context: the recomputation meets the wrappers
            out = _run(model, inputs)
            (out.square().mean() + sum(q.square().mean() for q in store.queries)).backward()
        assert store.layer_indices == list(range(len(LAYOUT[family])))  # still one entry per layer after backward
        return [p.grad for p in model.parameters() if p.grad is not None]

    plain, ckpt = run(False), run(True)
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "qwen"])
def test_bf16_autocast_capture_runs_at_model_precision(family):
    model, inputs = _build(family, torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(model, inputs)
        with capture_qk(model, export_values=True) as store:
            out = _run(model, inputs)
    assert torch.equal(out, ref)
    assert len(store.queries) == len(LAYOUT[family])
    assert {q.dtype for q in (*store.queries, *store.keys, *store.values, *store.outputs)} == {torch.bfloat16}
    # Loosely the same maps as float32 (bf16 rounding of q, k only); a wrong layout would be O(1) off.
    with torch.no_grad(), capture_qk(model) as exact:
        _run(model, inputs)
    for lo, hi, lo_k, hi_k, lo_b, hi_b in zip(store.queries, exact.queries, store.keys, exact.keys, store.biases, exact.biases):
        assert (_probs(lo, lo_k, lo_b) - _probs(hi, hi_k, hi_b)).abs().max().item() < 0.05


def test_sana_and_unlisted_diffusers_classes_are_refused():
    sana = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1)
    with pytest.raises(NotImplementedError, match="SANA's self-attention is linear.*FluxTransformer2DModel"):
        capture_qk(sana)
    unlisted = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                                     down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    with pytest.raises(NotImplementedError, match="UNet2DModel has no entry.*QwenImageTransformer2DModel"):
        capture_qk(unlisted)


# --------------------------------------------------------------------------------- SHD inputs


@pytest.mark.numerics
@pytest.mark.parametrize("keys,chunk", [("all", 6), ("all", None), ("image", 6)])
def test_shd_term_on_selected_inputs_equals_the_whole_map_reference(keys, chunk):
    teacher, inputs = _build("qwen", heads=4, seed=1)
    student, _ = _build("qwen", heads=2, seed=2)
    with torch.no_grad(), capture_qk(teacher, export_values=True) as t:
        _run(teacher, inputs)
    with capture_qk(student) as s:
        _run(student, inputs)
    # Reference, independent of the store's segments: Qwen-Image's [text, image] order, the padded
    # caption's keys masked from the input mask, the image out-projection from the module.
    rows = slice(TEXT, TEXT + IMAGE)
    cols = rows if keys == "image" else slice(0, TEXT + IMAGE)
    key_mask = torch.cat([_caption_mask().bool(), torch.ones(B, IMAGE, dtype=torch.bool)], 1)[:, None, None, cols]
    bias = torch.zeros(key_mask.shape, dtype=torch.float64).masked_fill(~key_mask, -math.inf)  # (B, 1, 1, M)
    for layer in range(2):
        inp = shd_inputs(t, layer, s, layer, keys=keys)
        per_sample, alphas = shd_term(**inp._asdict(), chunk_size=chunk, temperature=2.0)  # 6: 3 row blocks
        t_maps = _probs(t.queries[layer][:, :, rows], t.keys[layer][:, :, cols], bias)  # (B, 4, IMAGE, M)
        w = teacher.transformer_blocks[layer].attn.to_out[0].weight
        _, ref_alphas = squeeze_heads(t_maps, t.values[layer][:, :, cols], w, 2)  # alpha from the T = 1 maps
        # The loss at T_a = 2: the teacher's maps at T_a squeezed with those alphas.
        t_soft = _probs(t.queries[layer][:, :, rows] / 2.0, t.keys[layer][:, :, cols], bias / 2.0)
        target = apply_alphas(t_soft, ref_alphas, default_groups(4, 2))  # (B, 2, IMAGE, M)
        s_maps = _probs(s.queries[layer][:, :, rows] / 2.0, s.keys[layer][:, :, cols], bias / 2.0)
        reference = shd_loss([s_maps], [target], beta=1.0)
        assert per_sample.shape == (B,) and reference.min() > 1e-3  # a real, nonzero loss
        torch.testing.assert_close(alphas, ref_alphas, atol=1e-10, rtol=0)
        torch.testing.assert_close(per_sample, reference, atol=1e-10, rtol=0)
        # Gradients to the student's captured q, k: the term's hand-written backward vs autograd.
        got = torch.autograd.grad(per_sample.sum(), [s.queries[layer], s.keys[layer]], retain_graph=True)
        want = torch.autograd.grad(reference.sum(), [s.queries[layer], s.keys[layer]], retain_graph=True)
        assert want[0].abs().max() > 1e-4
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        err = max((per_sample - reference).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(got, want)))
        print(f"layer {layer} keys={keys} chunk={chunk}: max |shd_term - whole map| (loss, grads) = {err:.1e}")
    # The loss reaches the student's parameters through the captured q, k.
    per_sample.sum().backward()
    assert student.transformer_blocks[1].attn.to_q.weight.grad.abs().sum() > 0
