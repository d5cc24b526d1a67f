"""Stable Diffusion models the project builds itself, with no download.

`builtin:tiny-sd` is the ~110k-parameter model the tests train: fixed seeds, so its weights are the same on every
machine. Its VAE is random and maps every image to mush, which the tests do not mind (their pinned losses were
recorded with it). `builtin:tiny-sd-quickstart` (~880k parameters) is the model of examples/quickstart.json, made
so that a minute of CPU training shows in the samples:
- its VAE's weights are written down, not drawn (colour_vae): it encodes an image as its colours at 1/8 size and
  decodes them back, so a sample shows the colours the UNet put in the latent;
- a wider UNet (32/64 channels) and text encoder (32), with 77 tokens: the tokenizer has one token a character, and
  16 tokens cut "a red circle on a blue background" before its background;
- v-prediction: at high noise its target is mostly the clean latent, so the first sampling steps place the colours
  even while the model is weak, where an epsilon model's x0 estimate (its error times up to 15) is noise.
It has its own name, so a cached tiny-sd folder (built once per logdir) never stands in for it.
`builtin:sd15` and `builtin:sd21` are the real SD1.5 and SD2.1 (768-v) architectures with random weights, for speed
and memory benchmarks (speed does not depend on the values). All share a generated character-level CLIP tokenizer,
so nothing is fetched from a hub.
`builtin:tiny-sdxl` is an SDXL-shaped model as small as tiny-sd: two text encoders (CLIPTextModel, hidden 16, and
CLIPTextModelWithProjection, hidden 24 projected to 12: the UNet's cross-attention takes their 40 concatenated
channels, its "text_time" added embedding the 12 pooled ones plus six size/crop numbers), a 3-level UNet whose first
level has no attention and whose last has 2 transformer layers, as SDXL's. Its text projection is a random 12 x 24
matrix, so a converter that forgets OpenCLIP's transposition fails on shapes, not silently. `builtin:sdxl` is the
real SDXL 1.0 base architecture (2.6G UNet parameters) with random weights, for benchmarks only.
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
# colour_vae's layout: 4 levels (1/8 size latents, as in SD), 12 channels in 3 groups of 4. scaling_factor brings
# the quickstart images' latents (pixel values in [-1, 1], std 0.61 at 1/8 size) to a std near 1, as SD's 0.18215.
_COLOUR_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(12,) * 4, norm_num_groups=3,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   sample_size=64, scaling_factor=1.6)
_QS_UNET = {**_TINY_UNET, "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
            "norm_num_groups": 8}
_QS_CLIP = {**_TINY_CLIP, "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 77}
COLOUR_VAE_BUILTINS = {"tiny-sd-quickstart"}  # the built-ins whose VAE is colour_vae's, not random

_SD_UNET = dict(act_fn="silu", block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, in_channels=4, out_channels=4,
                layers_per_block=2, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  num_train_timesteps=1000, steps_offset=1)

# SDXL: a UNet with the "text_time" added embedding (pooled text of the second encoder + 6 sinusoidal size/crop
# numbers of addition_time_embed_dim each), cross-attention over both encoders' hidden states concatenated.
_TINY_CLIP_2 = {**_TINY_CLIP, "hidden_size": 24, "intermediate_size": 48, "projection_dim": 12, "hidden_act": "gelu",
                "pad_token_id": 33}   # tokenizer_2 pads with "!" (id 33 in the character vocabulary), as OpenCLIP
_TINY_SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), norm_num_groups=4,
                       use_linear_projection=True, cross_attention_dim=16 + 24, addition_embed_type="text_time",
                       addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4)
_SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
                  block_out_channels=(320, 640, 1280), norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                    bos_token_id=512, eos_token_id=513, pad_token_id=513)
_SDXL_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                    bos_token_id=512, eos_token_id=513, pad_token_id=33)
# SDXL's scheduler is SD's noise schedule with "leading" spacing; its VAE is SD's with a smaller latent scale and
# fp32 decoding in fp16 pipelines (force_upcast).
_SDXL_SCHEDULER = {**_SCHEDULER, "timestep_spacing": "leading"}
_SDXL_VAE_SCALE = dict(scaling_factor=0.13025, force_upcast=True)

# name -> (unet kwargs, CLIP text config, VAE kwargs, scheduler kwargs, tokenizer max length)
BUILTINS = {
    "tiny-sd": (_TINY_UNET, _TINY_CLIP, _TINY_VAE, _SCHEDULER, 16),
    # see the docstring for the wider parts, 77 tokens and v-prediction
    "tiny-sd-quickstart": (_QS_UNET, _QS_CLIP, _COLOUR_VAE,
                           {**_SCHEDULER, "prediction_type": "v_prediction"}, 77),
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
    "tiny-sdxl": (_TINY_SDXL_UNET, _TINY_CLIP, {**_TINY_VAE, **_SDXL_VAE_SCALE}, _SDXL_SCHEDULER, 16),
    "sdxl": (_SDXL_UNET, _SDXL_CLIP_L, {**_SD_VAE, **_SDXL_VAE_SCALE, "sample_size": 1024}, _SDXL_SCHEDULER, 77),
}
# The second text encoder (text_encoder_2/, CLIPTextModelWithProjection, tokenizer_2/ padding with "!") of the
# built-ins that have one; their model_index.json names StableDiffusionXLPipeline.
SECOND_TEXT_ENCODER = {"tiny-sdxl": _TINY_CLIP_2, "sdxl": _SDXL_CLIP_G}


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


def write_tokenizer(folder: Path, max_length: int, pad_token: str = "<|endoftext|>") -> None:
    """A character-level CLIP tokenizer: 256 byte symbols, the same with `</w>`, then the two specials.
    pad_token "!" is OpenCLIP's padding (SD2's and SDXL's second tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [_byte_to_unicode()[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
         "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": pad_token, "unk_token": "<|endoftext|>"}),
        encoding="utf-8")


def write_builtin(name: str, folder: Path) -> Path:
    """Build the named model with fixed seeds and save it as a diffusers folder (the real loading path reads it)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
    vae = colour_vae(vae_kw) if name in COLOUR_VAE_BUILTINS else AutoencoderKL(**vae_kw)
    scheduler = DDPMScheduler(**sched_kw)
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", max_len)
    parts = {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if name in SECOND_TEXT_ENCODER:
        torch.manual_seed(3)
        CLIPTextModelWithProjection(CLIPTextConfig(**SECOND_TEXT_ENCODER[name])).save_pretrained(
            folder / "text_encoder_2")
        write_tokenizer(folder / "tokenizer_2", max_len, pad_token="!")
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True, **parts,
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    else:
        index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                 "requires_safety_checker": False, "safety_checker": [None, None], **parts}
    (folder / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.42.1", **index}, indent=2),
                                             encoding="utf-8")
    return folder


_BIG = 100.0  # colour_vae's constant channels; see there


def colour_vae(vae_kw: dict):
    """An AutoencoderKL (12 channels in 3 groups of 4, any number of levels) that encodes an image as its mean
    colour over each f x f block (f = 2 ** (levels - 1)), in latent channels 0-2 (channel 3 is always 0), and
    decodes a latent by repeating each colour over its block: the decoder's output is exactly the latent, scaled
    back and upsampled. No weight is random, so there is nothing to train and nothing to seed.

    How each part becomes what it must be:
    - every resnet's conv2 and every attention's output projection are zero, so those blocks pass their input
      through unchanged (they add their output to a skip connection);
    - the encoder's downsamplers average each 2 x 2 block, the decoder's upsamplers (nearest x2, then a conv)
      keep the centre tap: identities around the resampling;
    - the GroupNorm before each conv_out would remove every group's mean, the colour itself. So each group g
      carries (x_g, -x_g, +BIG, -BIG): the group's mean is exactly 0, its variance (mean(x_g^2) + BIG^2) / 2 is
      BIG^2 / 2 within 1e-4 for colours in [-1, 1], and a norm weight of BIG / sqrt(2) gives x_g and -x_g back;
    - the SiLU after it is undone by conv_out reading silu(x) - silu(-x), which is x exactly.
    The posterior's log-variance is -30 (std 3e-7): a latent sample is the mean."""
    import math

    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_kw)
    enc, dec = vae.encoder, vae.decoder
    width = vae_kw["block_out_channels"]
    if set(width) != {12} or vae_kw["norm_num_groups"] != 3 or vae_kw["latent_channels"] != 4:
        raise ValueError("colour_vae needs 12 channels in 3 norm groups everywhere and 4 latent channels")

    def centre(conv, out_ch: int, in_ch: int, value: float) -> None:
        conv.weight[out_ch, in_ch, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = value

    def colours_in(conv) -> None:  # 3 colour (or latent) channels -> (x, -x, BIG, -BIG) per group
        for g in range(3):
            centre(conv, 4 * g, g, 1.0)
            centre(conv, 4 * g + 1, g, -1.0)
            conv.bias[4 * g + 2], conv.bias[4 * g + 3] = _BIG, -_BIG

    def colours_out(conv) -> None:  # silu(x_g) - silu(-x_g) = x_g -> channel g
        for g in range(3):
            centre(conv, g, 4 * g, 1.0)
            centre(conv, g, 4 * g + 1, -1.0)

    def norm_keeping_mean(norm) -> None:
        for g in range(3):
            norm.weight[4 * g] = norm.weight[4 * g + 1] = _BIG / math.sqrt(2)

    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()   # GroupNorm weights too: unused norms scale to 0, and zeroed convs after them add nothing
        colours_in(enc.conv_in)
        for block in enc.down_blocks:
            for down in block.downsamplers or []:
                # pad (0, 1, 0, 1), 3 x 3 kernel, stride 2: taps [0:2, 0:2] are the 2 x 2 block, padding unread
                for c in range(12):
                    down.conv.weight[c, c, :2, :2] = 0.25
        norm_keeping_mean(enc.conv_norm_out)
        colours_out(enc.conv_out)
        enc.conv_out.bias[4:] = -30.0          # log-variance
        for c in range(8):
            centre(vae.quant_conv, c, c, 1.0)
        for c in range(4):
            centre(vae.post_quant_conv, c, c, 1.0)
        colours_in(dec.conv_in)
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                for c in range(12):
                    centre(up.conv, c, c, 1.0)
        norm_keeping_mean(dec.conv_norm_out)
        colours_out(dec.conv_out)
    return vae


def builtin_folder(name: str, cache_root: Path) -> Path:
    """The built-in model's diffusers folder under cache_root, built once and reused."""
    folder = Path(cache_root) / name
    if not (folder / "model_index.json").exists():
        from utils.core.file_writes import replace_folder_atomic
        replace_folder_atomic(folder, lambda tmp: write_builtin(name, tmp))
    return folder
