"""A tiny Stable Diffusion folder for the tests (``save_pretrained``): UNet2DConditionModel, AutoencoderKL, a
scheduler, and a CLIP tokenizer + text encoder written from scratch (whole words as tokens)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "cat", "dog", "photo", "of"]


def tokenizer(folder: Path):
    """A tiny CLIP BPE tokenizer written from scratch (whole words as tokens: no merges needed)."""
    from transformers import CLIPTokenizer

    vocab, merges = {}, []

    def add(token):
        vocab.setdefault(token, len(vocab))
    for token in ["<|startoftext|>", "<|endoftext|>"] + sorted({c for w in WORDS for c in w}):
        add(token)
        if len(token) == 1:
            add(token + "</w>")
    for w in WORDS:  # merge a word's characters left to right, ending in the whole word
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def sd_folder(root: Path, scheduler=None):
    """(folder, pipeline): a tiny SD pipeline saved under ``root / "pipe"`` (16x16 pixels, 8x8x4 latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=4,
                                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    tok = tokenizer(root / "tok_src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler or EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe", pipe
