"""A tiny random Stable-Diffusion-layout pipeline, built and saved in the test (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "defect", "crack", "scratch", "object")


def write_tokenizer_files(root: Path) -> tuple[Path, Path]:
    """CLIP BPE files: every letter (alone and word-final) plus merges that make WORDS single tokens."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        if len(word) == 1:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return root / "vocab.json", root / "merges.txt"


def build_tiny_pipeline(root: Path, seed: int = 0, inpainting: bool = False, max_length: int = 12) -> Path:
    """tokenizer/, text_encoder/, vae/, unet/, scheduler/ under `root`, as `from_pretrained` expects.
    32 px images, latents 4 x 16 x 16."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab, merges = write_tokenizer_files(root / "_bpe")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1, projection_dim=16)
    text_encoder = CLIPTextModel(text_config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32,
                        # No global attention in the tiny VAE, so pixels far from the region depend only on
                        # nearby latents and "outside is unchanged" is testable pixel by pixel.
                        mid_block_add_attention=False)
    unet = UNet2DConditionModel(sample_size=16, in_channels=9 if inpainting else 4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tokenizer.save_pretrained(root / "tokenizer")
    text_encoder.save_pretrained(root / "text_encoder")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return root
