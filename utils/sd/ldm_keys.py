"""Key renaming between diffusers state dicts and the original LDM single-file layout, both directions.

diffusers -> LDM has no library function; the mapping below is derived from the UNet/VAE topology in the diffusers
config (LDM numbers its UNet blocks linearly), so any SD1/SD2/SDXL-topology model, including the tiny test models,
maps with the same code. LDM -> diffusers goes through diffusers' own single-file functions. The text encoder's single-file
layout ("hf_clip" or "open_clip") and key prefix come from its family record (utils/sd/families.py).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Callable

import torch

from utils.core.config_schema import ConfigError
from utils.sd.families import UNET_PREFIX, VAE_PREFIX, TextEncoder, family_from_text_configs

log = logging.getLogger(__name__)

# Buffers LatentDiffusion.register_schedule stores; web UIs read alphas_cumprod from the file when present.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# Both namings of the VAE mid-block attention: diffusers < 0.14 wrote query/key/value/proj_attn, newer versions
# to_q/to_k/to_v/to_out.0. EveryDream2 mapped only the old one (D27); ComfyUI then silently skipped the new keys.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _int_layers(config: dict, what: str, default: int) -> int:
    layers = config.get("layers_per_block", default)  # the model class's default when the config omits it
    if not isinstance(layers, int):
        raise ConfigError(f"{what}: per-block layers_per_block {layers!r} is not an SD1/SD2 topology")
    return layers


def _unet_prefix_map(config: dict) -> dict[str, str]:
    """diffusers prefix -> LDM prefix. LDM counts input_blocks/output_blocks straight through all levels:
    per level `layers_per_block` resnet(+attention) blocks, then one down/upsample block."""
    levels, per = len(config["block_out_channels"]), _int_layers(config, "unet", 2)
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2.",
         # SDXL's "text_time" added embedding (pooled text + size/crop numbers): SGM's label_emb MLP
         "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    for i in range(levels):
        for j in range(per):
            n = i * (per + 1) + j + 1
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        for j in range(per + 1):
            n = i * (per + 1) + j
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
            # The upsampler follows the block's last resnet, after its attention if the block has one.
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{slot}."
    return m


def _vae_prefix_map(config: dict) -> dict[str, str]:
    """LDM's decoder numbers its levels from the bottom (up.{n-1} runs first), diffusers' from the top."""
    levels, per = len(config["block_out_channels"]), _int_layers(config, "vae", 1)
    m = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in.": f"{part}.conv_in.", f"{part}.conv_out.": f"{part}.conv_out.",
                  f"{part}.conv_norm_out.": f"{part}.norm_out.",
                  f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                  f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                  f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1."})
    for i in range(levels):
        for j in range(per):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    return m


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):  # "to_out.0" before anything shorter
        if rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def _map_keys(sd: dict[str, torch.Tensor], prefixes: dict[str, str], what: str,
              inner: Callable[[str, str], str]) -> dict[str, torch.Tensor]:
    ordered = sorted(prefixes, key=len, reverse=True)
    out, unknown = {}, []
    for key, value in sd.items():
        hit = next((p for p in ordered if key.startswith(p)), None)
        if hit is None:
            unknown.append(key)
            continue
        out[prefixes[hit] + inner(hit, key[len(hit):])] = value
    if unknown:
        raise ConfigError(f"{what}: {len(unknown)} tensors have no LDM equivalent (not an SD1/SD2 topology?), "
                          f"e.g. {', '.join(unknown[:3])}")
    return out


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*`. Transformer-block internals
    (attn1/attn2/ff/norm1-3, proj_in/out) have the same names in both layouts; only block positions move."""
    def inner(prefix: str, rest: str) -> str:
        return _rename_inner(rest, _UNET_RESNET) if ".resnets." in prefix else rest
    return {UNET_PREFIX + k: v for k, v in _map_keys(sd, _unet_prefix_map(config), "unet", inner).items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*`, attention projections as 1x1 convs."""
    def inner(prefix: str, rest: str) -> str:
        if ".resnets." in prefix:
            return _rename_inner(rest, _VAE_RESNET)
        return _rename_inner(rest, _VAE_ATTN) if ".attentions." in prefix else rest
    out = {}
    for k, v in _map_keys(sd, _vae_prefix_map(config), "vae", inner).items():
        # LDM's AttnBlock uses Conv2d(C, C, 1) for q/k/v/proj_out; diffusers stores Linear [C, C] weights.
        if ".mid.attn_1." in k and k.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[VAE_PREFIX + k] = v
    return out


def _strip_text_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 4.x (and 5.x's CLIPTextModelWithProjection) nest under `text_model.`; 5.x CLIPTextModel does not.
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def in_model_naming(sd: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """A text-encoder state dict from ldm_to_text_encoder (no `text_model.` prefix) in the naming of the model that
    loads it: transformers 4.x, and 5.x's CLIPTextModelWithProjection, nest the transformer under `text_model.`."""
    if not any(k.startswith("text_model.") for k in model_keys):
        return sd
    return {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in sd.items()}


def text_encoder_of(config: dict) -> TextEncoder:
    """The family record of the single text encoder of a one-encoder family this transformers config describes;
    callers converting a family with several (SDXL) pass the record itself."""
    return family_from_text_configs([config], "text_encoder").text_encoders[0]


def clip_to_ldm(sd: dict[str, torch.Tensor], config: dict, encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """SD1 (and SDXL's first encoder): the HF CLIPTextModel state dict as the original releases stored it
    (transformers 4.x names)."""
    prefix = encoder.single_file_prefix
    out = {}
    for k, v in _strip_text_model(sd).items():
        if k == "embeddings.position_ids":
            continue  # re-added below in the release's form
        if k == "text_projection.weight":
            log.warning("text_encoder: dropping text_projection.weight; SD1's CLIP layout has no projection")
            continue
        out[prefix + "text_model." + k] = v
    # The releases carry this buffer (persistent before transformers 4.31); some loaders still look for it.
    n = config.get("max_position_embeddings", 77)
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(sd: dict[str, torch.Tensor], config: dict, encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """SD2 / SDXL's second encoder: diffusers' CLIPTextModel(WithProjection) (N layers) -> OpenCLIP text tower
    (N + encoder.file_extra_layers resblocks), q/k/v fused to in_proj.

    SD2 releases hold 24 resblocks but condition on the penultimate one, which is why diffusers keeps 23. Web UIs
    expect all 24, so the last is written as a copy of the one before it (kohya does the same); nothing in SD2
    inference reads it. SDXL keeps all 32 in both layouts. `text_projection` (SDXL: the real one, transposed; SD2:
    identity) and `logit_scale` (log 100, where trained OpenCLIP models end) are written as the releases have them;
    only SDXL's projection is read by inference (its pooled output).
    """
    P, out, qkv, unknown = encoder.single_file_prefix, {}, {}, []
    for k, v in _strip_text_model(sd).items():
        if k == "embeddings.position_ids":
            continue
        if k == "embeddings.token_embedding.weight":
            out[P + "token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out[P + "positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out[P + "ln_final." + k.split(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out[P + "text_projection"] = v.t()  # OpenCLIP computes x @ P, a Linear computes x @ W.T
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            rest = _rename_inner(m[2], _OPEN_CLIP_LAYER)
            if rest == m[2]:
                unknown.append(k)
            out[f"{P}transformer.resblocks.{m[1]}.{rest}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise ConfigError(f"text_encoder: {len(unknown)} tensors have no OpenCLIP equivalent, "
                          f"e.g. {', '.join(unknown[:3])}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConfigError(f"text_encoder: layer {layer} lacks one of q/k/v_proj.{kind}")
        out[f"{P}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    n = config["num_hidden_layers"]
    last = f"{P}transformer.resblocks.{n - 1}."
    for extra in range(n, n + encoder.file_extra_layers):
        for k in [k for k in out if k.startswith(last)]:
            out[f"{P}transformer.resblocks.{extra}." + k[len(last):]] = out[k].clone()
    ref = out[P + "token_embedding.weight"]
    if P + "text_projection" not in out:
        out[P + "text_projection"] = torch.eye(ref.shape[1], dtype=ref.dtype)
    out[P + "logit_scale"] = torch.tensor(math.log(100.0), dtype=ref.dtype)
    return out


def text_encoder_to_ldm(sd: dict[str, torch.Tensor], config: dict, encoder: TextEncoder | None = None
                        ) -> dict[str, torch.Tensor]:
    """One text encoder's state dict -> its single-file keys (encoder: its family record; by default the one a
    one-encoder family with this config has)."""
    encoder = encoder or text_encoder_of(config)
    to_ldm = open_clip_to_ldm if encoder.layout == "open_clip" else clip_to_ldm
    return to_ldm(sd, config, encoder)


def schedule_buffers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    """LatentDiffusion.register_schedule's buffers (float64 math, stored fp32), from the scheduler's betas.

    Only the two schedules SD uses are written; a zero-terminal-SNR rescale is not embedded, because web UIs
    that read alphas_cumprod from the file divide by it (they have their own ZTSNR option).
    """
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    start, end = float(scheduler_config.get("beta_start", 0.00085)), float(scheduler_config.get("beta_end", 0.012))
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":  # LDM calls this one "linear"
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        log.warning("scheduler beta_schedule %r: noise-schedule buffers not written (web UIs use the yaml's)", kind)
        return {}
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
              "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
              "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
              "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
              "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
              "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)}
    return {k: values[k].to(torch.float32) for k in SCHEDULE_BUFFERS}



def ldm_to_unet(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    return convert_ldm_unet_checkpoint(sd, config)


def ldm_to_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    return convert_ldm_vae_checkpoint(sd, config)


def ldm_to_text_encoder(sd: dict[str, torch.Tensor], config: dict, encoder: TextEncoder | None = None
                        ) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) state dict in transformers 5.x naming (no `text_model.` prefix), from the
    single-file layout of `encoder` (by default the one a one-encoder family with this config has)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    encoder = encoder or text_encoder_of(config)
    keep_projection = encoder.transformers_class == "CLIPTextModelWithProjection"
    if encoder.layout == "open_clip":
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        out = _strip_text_model(convert_open_clip_checkpoint(stub, sd, prefix=encoder.single_file_prefix))
        n = config["num_hidden_layers"]

        def keep(k: str) -> bool:  # SD2's unused last resblock, and its identity projection, have no place here
            m = re.match(r"encoder\.layers\.(\d+)\.", k)
            return not (m and int(m[1]) >= n) and (keep_projection or k != "text_projection.weight")
        out = {k: v for k, v in out.items() if keep(k)}
    else:
        # Some tools already write 5.x names under cond_stage_model.transformer.; stripping covers both.
        out = _strip_text_model(convert_ldm_clip_checkpoint(sd, remove_prefix=encoder.single_file_prefix))
    out.pop("embeddings.position_ids", None)  # a non-persistent buffer in transformers 5.x
    return out

