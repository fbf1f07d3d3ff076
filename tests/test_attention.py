"""Attention processors and the capture context (shd_diffusion.attention)."""

import pytest
import torch
from torch import nn

from shd_diffusion.attention import (
    Attention,
    CaptureProcessor,
    SDPAProcessor,
    attention_layers,
    attention_probs,
    capture_attention,
    capture_qk,
    project_qkv,
)
from shd_diffusion.models import create_model

pytestmark = pytest.mark.numerics  # rerun on every CPU vector path (test_vector_paths)

# Float32 SDPA vs explicit softmax(QK^T)V: different summation order only.
OUT_ATOL = 1e-5
# bf16 autocast vs float32, same weights: q, k, v carry bf16 rounding (2^-9 relative) from the
# projections, which moves logits of size ~5 by ~1e-2. Measured on these tiny stacks: maps 1.2e-3,
# outputs 3.6e-3 (max |out| 3.3); an ignored bias or a wrong softmax is off by O(0.1) or more.
AUTOCAST_MAP_ATOL = 5e-3
AUTOCAST_OUT_ATOL = 2e-2


class Biased(Attention):
    """Attention with a fixed random additive bias, standing in for MDT's relative bias."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__(dim, heads)
        self.bias = nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def attention_bias(self, ids_keep=None):
        return self.bias


class Stack(nn.Module):
    def __init__(self, dim=32, heads=4, tokens=10, depth=3, biased=True):
        super().__init__()
        make = (lambda: Biased(dim, heads, tokens)) if biased else (lambda: Attention(dim, heads))
        self.blocks = nn.ModuleList(make() for _ in range(depth))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def explicit_maps(attn: Attention, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Oracle: per-head softmax((q k^T / sqrt(d) + bias) / T) written out by hand."""
    b, n, c = x.shape
    h = attn.heads
    d = c // h
    w_q, w_k, _ = attn.qkv.weight.chunk(3, dim=0)
    b_q, b_k, _ = attn.qkv.bias.chunk(3)
    maps = torch.empty(b, h, n, n)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        q = x @ w_q[sl].T + b_q[sl]  # (B, N, d)
        k = x @ w_k[sl].T + b_k[sl]
        logits = q @ k.transpose(1, 2) / d**0.5
        bias = attn.attention_bias()
        if bias is not None:
            logits = logits + bias[0, head]
        maps[:, head] = torch.softmax(logits / temperature, dim=-1)
    return maps


@pytest.mark.parametrize("biased", [False, True])
def test_capture_output_equals_sdpa(biased):
    torch.manual_seed(0)
    model = Stack(biased=biased)
    x = torch.randn(2, 10, 32)
    fast = model(x)
    with capture_attention(model, temperature=2.0) as store:
        captured = model(x)
    assert len(store.maps) == 3
    torch.testing.assert_close(captured, fast, atol=OUT_ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_maps_equal_explicit_softmax_with_bias_and_temperature(temperature):
    torch.manual_seed(1)
    model = Stack(biased=True, depth=2)
    x = torch.randn(3, 10, 32)
    with capture_attention(model, temperature=temperature) as store:
        model(x)
    # Layer 0 sees x itself; layer 1 sees x + layer0(x).
    x1 = x + model.blocks[0](x)
    for m, inp, got in zip(model.blocks, (x, x1), store.maps):
        want = explicit_maps(m, inp, temperature)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(3, 4, 10), atol=1e-6, rtol=0)
    if temperature != 1.0:
        # T=1 probabilities are exported alongside the softened maps.
        torch.testing.assert_close(store.probs[0], explicit_maps(model.blocks[0], x, 1.0), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(store.probs[0], store.maps[0])


def test_processors_restored_and_selected_layers_only():
    model = Stack(depth=4)
    originals = [blk.processor for blk in model.blocks]
    with capture_attention(model, layers=[1, -1]) as store:
        kinds = [type(blk.processor) for blk in model.blocks]
        model(torch.randn(1, 10, 32))
    assert kinds == [SDPAProcessor, CaptureProcessor, SDPAProcessor, CaptureProcessor]
    assert store.layer_indices == [1, 3]
    assert [blk.processor for blk in model.blocks] == originals


def test_processors_restored_after_exception():
    model = Stack()
    originals = [blk.processor for blk in model.blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    assert [blk.processor for blk in model.blocks] == originals


def test_layer_index_out_of_range():
    with pytest.raises(IndexError, match="3 attention layers"):
        with capture_attention(Stack(), layers=[3]):
            pass


def test_student_maps_keep_graph_teacher_export_detached():
    torch.manual_seed(2)
    model = Stack(depth=1)
    x = torch.randn(2, 10, 32)
    with capture_attention(model, temperature=2.0) as store:
        model(x)
    store.maps[0].pow(2).sum().backward()
    qkv_grad = model.blocks[0].qkv.weight.grad
    assert qkv_grad is not None and qkv_grad[:64].abs().sum() > 0  # Q and K rows got gradient
    assert qkv_grad[64:].abs().sum() == 0  # V does not influence the maps

    with torch.no_grad(), capture_attention(model, export_values=True) as teacher:
        model(x)
    assert not teacher.maps[0].requires_grad
    assert teacher.values[0].shape == (2, 4, 10, 8)
    assert teacher.out_weights[0].shape == (32, 32)
    # Values and W_out reproduce the attention output: sum_i A_i V_i W_i^T + b.
    blk = model.blocks[0]
    out = (teacher.probs[0] @ teacher.values[0]).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(out @ teacher.out_weights[0].T + blk.proj.bias, blk(x), atol=OUT_ATOL, rtol=0)
    # The exported per-head outputs are exactly those A_i V_i.
    assert teacher.outputs[0].shape == (2, 4, 10, 8) and teacher.outputs[0].dtype == torch.float32
    torch.testing.assert_close(teacher.outputs[0], teacher.probs[0] @ teacher.values[0], atol=1e-6, rtol=0)


def test_teacher_capture_requires_no_grad():
    model = Stack(depth=2)
    originals = [blk.processor for blk in model.blocks]
    with pytest.raises(RuntimeError, match=r"export_values=True.*torch\.no_grad"):
        with capture_attention(model, export_values=True):
            model(torch.randn(1, 10, 32))
    assert [blk.processor for blk in model.blocks] == originals
    with torch.inference_mode(), capture_attention(model, export_values=True) as store:
        model(torch.randn(1, 10, 32))  # inference mode counts as no-grad
    assert len(store.values) == 2


def test_capture_under_bf16_autocast_is_float32():
    torch.manual_seed(4)
    model = Stack(biased=True, depth=2)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        with capture_attention(model, temperature=2.0) as ref:
            model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with capture_attention(model, temperature=2.0) as got:
                model(x)
            with capture_attention(model, export_values=True) as teacher:
                model(x)
            q, k, _ = project_qkv(model.blocks[0], x)  # (B, H, N, d) each, bf16 under autocast
            in_autocast = attention_probs(q, k, model.blocks[0].scale, model.blocks[0].bias)
    assert q.dtype == torch.bfloat16  # the projections did run in bf16
    for entries in (got.maps, got.probs, teacher.maps, teacher.probs, teacher.values, teacher.out_weights):
        assert all(e.dtype == torch.float32 for e in entries)
    # Oracle: float32 softmax of exactly those bf16 q, k, computed outside autocast. A bf16
    # matmul or softmax would be ~1e-3 off; float32 on the same inputs agrees to rounding.
    blk = model.blocks[0]
    logits = (q.float() @ k.float().transpose(-2, -1)) * blk.scale + blk.bias  # (B, H, N, N)
    torch.testing.assert_close(got.maps[0], (logits / 2.0).softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.probs[0], logits.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(in_autocast, logits.softmax(-1), atol=1e-6, rtol=0)
    # And close to a float32 capture of the same weights.
    for a, b in zip(got.maps + got.probs, ref.maps + ref.probs):
        torch.testing.assert_close(a, b, atol=AUTOCAST_MAP_ATOL, rtol=0)


def test_sdpa_bias_under_bf16_autocast():
    # The fast path casts the additive bias to q's dtype (bf16): it must still be applied, and
    # agree with float32 and with the capture path under the same autocast.
    torch.manual_seed(5)
    model = Stack(biased=True, depth=2)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x)
            with capture_attention(model):
                captured = model(x)
        for blk in model.blocks:
            blk.bias.zero_()
        without_bias = model(x)
    torch.testing.assert_close(fast.float(), ref, atol=AUTOCAST_OUT_ATOL, rtol=0)
    torch.testing.assert_close(captured.float(), ref, atol=AUTOCAST_OUT_ATOL, rtol=0)
    # The tolerance is tight enough to notice a dropped bias.
    assert (without_bias - ref).abs().max() > 10 * AUTOCAST_OUT_ATOL


def _tiny_diffusers_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def test_works_on_diffusers_dit():
    torch.manual_seed(3)
    model = _tiny_diffusers_dit()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    y = torch.tensor([1, 3])
    # Reference: diffusers' own default processor, before ours is swapped in.
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in model.transformer_blocks)
    with torch.no_grad():
        reference = model(x, timestep=t, class_labels=y).sample
    for blk in model.transformer_blocks:
        blk.attn1.set_processor(SDPAProcessor())
    with torch.no_grad():
        fast = model(x, timestep=t, class_labels=y).sample
        with capture_attention(model, temperature=1.0) as store:
            captured = model(x, timestep=t, class_labels=y).sample
    assert len(store.maps) == 2 and store.maps[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(fast, reference, atol=OUT_ATOL, rtol=0)
    torch.testing.assert_close(captured, reference, atol=OUT_ATOL, rtol=0)
    # Against diffusers' own map-producing processor, which returns (B*heads, N, N).
    attn = model.transformer_blocks[0].attn1
    assert len(attention_layers(model)) == 2
    hidden = torch.randn(2, 16, 16)
    with torch.no_grad():
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(hidden))
        ref = attn.get_attention_scores(q, k).view(2, 2, 16, 16)
        with capture_attention(model, layers=[0]) as store:
            attn(hidden)
    torch.testing.assert_close(store.maps[0], ref, atol=1e-6, rtol=1e-5)


def test_diffusers_unsupported_features_raise():
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    torch.manual_seed(6)
    hidden = torch.randn(2, 16, 16)
    joint = DiffusersAttention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16)
    plain = _tiny_diffusers_dit().transformer_blocks[0].attn1
    for processor in (SDPAProcessor(), CaptureProcessor(store=None, layer_index=0)):
        with pytest.raises(NotImplementedError, match="add_k_proj, add_v_proj"):
            processor(joint, hidden, encoder_hidden_states=torch.randn(2, 5, 16))
        # diffusers-style key masks, (B, 1, M) and (B*heads, N, M): refused, not mis-broadcast.
        for mask in (torch.zeros(2, 1, 16), torch.zeros(4, 16, 16)):
            with pytest.raises(NotImplementedError, match="4-D additive logit bias"):
                processor(plain, hidden, attention_mask=mask)


# ------------------------------------------------------------------ q/k capture (training path)


def _param_grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("biased", [False, True])
def test_qk_capture_keeps_the_fused_output_and_gradients_bitwise(biased):
    # Same q, k, v into the same SDPA call: output and every parameter gradient are identical.
    torch.manual_seed(6)
    model = Stack(biased=biased)
    x = torch.randn(2, 10, 32)
    model(x).square().sum().backward()
    ref_grads = _param_grads(model)
    ref_out = model(x)
    model.zero_grad()
    with capture_qk(model, layers=[0, 2]) as store:
        out = model(x)
    out.square().sum().backward()
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(_param_grads(model), ref_grads))
    assert store.layer_indices == [0, 2] and not store.maps and not store.probs
    assert all(isinstance(m.processor, SDPAProcessor) for m in model.blocks)


def test_qk_capture_reconstructs_the_maps_and_carries_the_graph():
    torch.manual_seed(7)
    model = Stack(biased=True)
    x = torch.randn(2, 10, 32)
    with capture_attention(model, temperature=2.0) as maps:
        model(x)
    with capture_qk(model) as qk:
        model(x)
    torch.testing.assert_close(maps.maps[0], explicit_maps(model.blocks[0], x, 2.0), atol=1e-6, rtol=0)
    for blk, q, k, bias, want in zip(model.blocks, qk.queries, qk.keys, qk.biases, maps.maps):
        assert q.requires_grad and bias is blk.bias  # the layer's own bias, once (1, H, N, N), not per sample
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias  # (B, H, N, N)
        torch.testing.assert_close((logits / 2.0).softmax(-1), want, atol=1e-6, rtol=0)
    # A loss on the captured q reaches the projection weights.
    qk.queries[0].sum().backward()
    assert model.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_qk_teacher_capture_is_detached_needs_no_grad_and_keeps_model_precision():
    torch.manual_seed(8)
    model = Stack(biased=True, depth=2)
    x = torch.randn(2, 10, 32)
    with pytest.raises(RuntimeError, match="no_grad"):
        with capture_qk(model, export_values=True):
            model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_qk(model, export_values=True) as t:
            model(x)
    assert [q.dtype for q in t.queries] == [torch.bfloat16] * 2  # the projections' own precision
    assert [v.shape for v in t.values] == [(2, 4, 10, 8)] * 2
    assert all(w is blk.proj.weight or torch.equal(w, blk.proj.weight) for w, blk in zip(t.out_weights, model.blocks))
    assert all(not e.requires_grad for e in (*t.queries, *t.keys, *t.values, *t.biases))
    assert [tuple(b.shape) for b in t.biases] == [(1, 4, 10, 10)] * 2


def test_qk_capture_under_gradient_checkpointing_gives_the_same_gradients():
    # The captured q/k of a checkpointed block carry the graph through the recomputation, which
    # records into a scratch store (the context's store keeps one entry per layer).
    def grads(checkpointing):
        torch.manual_seed(9)
        model = create_model("MDTv2-S/2", input_size=8, hidden_size=32, depth=4, num_heads=2, decode_layer=2,
                             num_classes=10, in_channels=1)
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
        with capture_qk(model, layers=[1, 3]) as store:
            out = model(x, t, y)
        (out.square().mean() + sum(q.square().mean() + k.abs().mean() for q, k in zip(store.queries, store.keys))).backward()
        assert len(store.queries) == 2
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
