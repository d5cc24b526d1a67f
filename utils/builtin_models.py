"""Stable Diffusion models the project builds itself, with no download.

`builtin:tiny-sd` is the ~110k-parameter model the quickstart and the tests train: fixed seeds, so its
weights are the same on every machine. `builtin:sd15` and `builtin:sd21` are the real SD1.5 and SD2.1
(768-v) architectures with random weights, for speed and memory benchmarks (speed does not depend on the
values). All share a generated character-level CLIP tokenizer, so nothing is fetched from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"

_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
_TINY_CLIP = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 sample_size=16)

_SD_UNET = dict(act_fn="silu", block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, in_channels=4, out_channels=4,
                layers_per_block=2, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  num_train_timesteps=1000, steps_offset=1)

# name -> (unet kwargs, CLIP text config, VAE kwargs, scheduler kwargs, tokenizer max length)
BUILTINS = {
    "tiny-sd": (_TINY_UNET, _TINY_CLIP, _TINY_VAE, _SCHEDULER, 16),
    "tiny-sd-v": (_TINY_UNET, _TINY_CLIP, _TINY_VAE, {**_SCHEDULER, "prediction_type": "v_prediction"}, 16),
    "sd15": ({**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
             dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                  bos_token_id=512, eos_token_id=513, pad_token_id=513),
             {**_SD_VAE, "sample_size": 512}, _SCHEDULER, 77),
    "sd21": ({**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
              "use_linear_projection": True},
             dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                  bos_token_id=512, eos_token_id=513, pad_token_id=513),
             {**_SD_VAE, "sample_size": 768}, {**_SCHEDULER, "prediction_type": "v_prediction"}, 77),
}


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's byte-level table: printable bytes map to themselves, the other 68 to chr(256) onward."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(folder: Path, max_length: int) -> None:
    """A character-level CLIP tokenizer: 256 byte symbols, the same with `</w>`, then the two specials."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [_byte_to_unicode()[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
        encoding="utf-8")


def write_builtin(name: str, folder: Path) -> Path:
    """Build the named model with fixed seeds and save it as a diffusers folder (the real loading path reads it)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in BUILTINS:
        raise KeyError(name)
    unet_kw, clip_kw, vae_kw, sched_kw, max_len = BUILTINS[name]
    folder = Path(folder)
    # Each part is seeded right before it is built, so adding a part never shifts another's weights.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kw)
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_kw))
    torch.manual_seed(2)
    vae = AutoencoderKL(**vae_kw)
    scheduler = DDPMScheduler(**sched_kw)
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", max_len)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2), encoding="utf-8")
    return folder


def builtin_folder(name: str, cache_root: Path) -> Path:
    """The built-in model's diffusers folder under cache_root, built once and reused."""
    folder = Path(cache_root) / name
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        write_builtin(name, tmp)
        from utils.file_writes import match_umask
        match_umask(tmp)  # save_pretrained's safetensors files are created 0600
        tmp.rename(folder)
    return folder
