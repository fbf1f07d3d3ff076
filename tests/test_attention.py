"""Attention processors and the capture context (shd_diffusion.attention)."""

import pytest
import torch
from torch import nn

from shd_diffusion.attention import (
    Attention,
    CaptureProcessor,
    SDPAProcessor,
    attention_layers,
    capture_attention,
)

# Float32 SDPA vs explicit softmax(QK^T)V: different summation order only.
OUT_ATOL = 1e-5


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


def test_works_on_diffusers_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(3)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    for blk in model.transformer_blocks:
        blk.attn1.set_processor(SDPAProcessor())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    y = torch.tensor([1, 3])
    with torch.no_grad():
        fast = model(x, timestep=t, class_labels=y).sample
        with capture_attention(model, temperature=1.0) as store:
            captured = model(x, timestep=t, class_labels=y).sample
    assert len(store.maps) == 2 and store.maps[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(captured, fast, atol=OUT_ATOL, rtol=0)
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
