"""Tiny random text-to-image pipelines built offline, shared by the t2i tests.

PixArt-Sigma and FLUX.1 pipelines with a T5 (and CLIP) text encoder whose tokenizers are built
from the vocabulary below (no download), a 2x VAE and a random transformer, saved in the diffusers
layout; an image-caption folder (diffusers' imagefolder layout) and a tiny CLIP for CLIP score.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, PixArtSigmaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: E402
                          T5Config, T5EncoderModel, T5Tokenizer)

WORDS = "a photo of cat dog red blue sky tree car house big small on the".split()
TEXT_DIM, POOLED_DIM, SEQ, SIZE = 12, 10, 8, 16  # T5 width, CLIP width, tokens, pixels (latents 4 x 8 x 8)
SD3_CLIP_TOKENS = 77  # SD3's prompt states: 77 CLIP tokens, then the T5 ones


def t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(WORDS)}}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def vae(**kwargs) -> AutoencoderKL:  # 2x downsampling, 4 latent channels
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
                         sample_size=SIZE, **kwargs)


def t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2))


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (diffusers zero-inits output layers, which would make the teacher output 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def build_pipeline(root: Path, family: str) -> Path:
    """A tiny random ``family`` ("pixart", "flux" or "sd3") pipeline saved as ``root/family``."""
    torch.manual_seed(0)
    if family == "pixart":
        pipe = PixArtSigmaPipeline(
            tokenizer=t5_tokenizer(), text_encoder=t5(), vae=vae(), scheduler=DDPMScheduler(),
            transformer=PixArtTransformer2DModel(
                num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                norm_num_groups=1, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=TEXT_DIM,
                use_additional_conditions=False))
    elif family == "sd3":  # two CLIPs (widths 4 + 6 = the pooled 10, states padded to the T5 width 12) and a T5
        tokenizer = clip_tokenizer()
        tokenizer.model_max_length = SD3_CLIP_TOKENS
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.1), text_encoder=_sd3_clip(4),
            tokenizer=tokenizer, text_encoder_2=_sd3_clip(POOLED_DIM - 4), tokenizer_2=tokenizer, text_encoder_3=t5(),
            tokenizer_3=t5_tokenizer(),
            transformer=randomise(SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
                out_channels=4, pos_embed_max_size=8)))
    else:
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 2, hidden_size=POOLED_DIM, intermediate_size=16,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                            projection_dim=POOLED_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(shift_factor=0.1, scaling_factor=0.5),
            text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5(), tokenizer_2=t5_tokenizer(),
            transformer=randomise(FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                guidance_embeds=True, axes_dims_rope=(2, 2, 4))))
    pipe.save_pretrained(root / family)
    return root / family


def _sd3_clip(width: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(WORDS) + 2, hidden_size=width, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=SD3_CLIP_TOKENS, projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def caption_folder(root: Path, captions: list[str], extra_lines: Sequence[str] = ()) -> Path:
    """Images of different sizes + metadata.jsonl (diffusers' imagefolder layout); ``extra_lines``
    are appended to metadata.jsonl as they are (bad-input cases)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return root


def tiny_clip(folder: Path) -> Path:
    """A 1-layer CLIP with a character tokenizer, saved with its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(folder)
    return folder
