"""Diffusers <-> original LDM single-file checkpoints (SD1.x, SD2.x), offline.

Export (`save_single_file`) writes what AUTOMATIC1111, Forge, ComfyUI and diffusers' own `from_single_file` load:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE, attention projections as 1x1 convolutions),
`cond_stage_model.transformer.text_model.*` (SD1, CLIP ViT-L/14 as the original release stored it) or
`cond_stage_model.model.*` (SD2, OpenCLIP ViT-H/14 layout), the LDM noise-schedule buffers, and for SD2 or
v-prediction a `<stem>.yaml` sidecar, without which web UIs render an SD2 768-v model as noise.

Import (`single_file_to_diffusers`) goes the other way through diffusers' own LDM->diffusers functions, with the
UNet/VAE configs derived from the yaml files shipped in utils/ldm_configs/ and the real CLIP BPE tokenizer generated
from the merge list shipped there, so nothing is fetched from a hub.

The diffusers -> LDM direction has no library function; the key mapping below is derived from the UNet/VAE
topology in the diffusers config (LDM numbers its UNet blocks linearly), so any SD1-topology model, including the
tiny test models, maps with the same code.

Command line: `python -m utils.convert_ldm {to-single,to-diffusers,prune} ...` (see `main`, doc/CONVERSION.md).
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable, Literal

import torch

try:
    from utils.core.config_schema import ConfigError
    from utils.core.file_writes import match_umask
    from utils.sd.ldm_markers import MARKER_KEYS, V_PRED, marker_tensors, ztsnr_scheduler_config
    from utils.sd.model_arch import check_single_file_keys
except ImportError:  # run as a file from inside utils/
    from config_schema import ConfigError  # type: ignore[no-redef]
    from file_writes import match_umask  # type: ignore[no-redef]
    from ldm_markers import MARKER_KEYS, V_PRED, marker_tensors, ztsnr_scheduler_config  # type: ignore[no-redef]
    from model_arch import check_single_file_keys  # type: ignore[no-redef]

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().with_name("ldm_configs")
BPE_FILE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."   # SD1: HF CLIPTextModel state dict (transformers 4.x keys)
OPEN_CLIP_PREFIX = "cond_stage_model.model."    # SD2: OpenCLIP text tower

# The sidecar each (version, prediction type) needs; SD1 epsilon is what every web UI assumes without one.
SIDECARS = {("sd1", "epsilon"): None, ("sd1", "v_prediction"): "v1-inference-v.yaml",
            ("sd2", "epsilon"): "v2-inference.yaml", ("sd2", "v_prediction"): "v2-inference-v.yaml"}
IMPORT_YAMLS = {("sd1", "epsilon"): "v1-inference.yaml", **{k: v for k, v in SIDECARS.items() if v}}

# Text-encoder configs of the real releases: kohya and diffusers use the same literals. SD2 keeps 23 of OpenCLIP-H's
# 24 layers because SD2 conditions on the penultimate layer's output.
TEXT_CONFIGS = {
    "sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
}
# diffusers' SD1.5 / SD2.x tokenizers differ only in padding: SD2 pads with "!" (id 0), as OpenCLIP does.
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}

# Buffers LatentDiffusion.register_schedule stores; web UIs read alphas_cumprod from the file when present.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")

Fmt = Literal["safetensors", "ckpt"]


# --------------------------------------------------------------------------------------------------------------
# Files: reading, atomic writing
# --------------------------------------------------------------------------------------------------------------

def _temp_sibling(path: Path) -> Path:
    # Not tempfile.mkstemp/mkdtemp: those create 0600/0700 entries, and the renamed result must stay readable by
    # a web UI running as another user, as any normally created file would be (safetensors' save_file creates
    # 0600 files all the same: match_umask fixes those before the rename).
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write(out_path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the same folder, then os.replace: a reader never sees half a checkpoint."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out_path)
    try:
        write(tmp)
        match_umask(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _load_ckpt(path: Path) -> dict:
    """torch.load with weights_only=True: a checkpoint that needs code execution is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only used to improve the message
            names = []
        what = f" (it references {', '.join(names[:5])})" if names else ""
        raise ConfigError(
            f"{path}: this .ckpt needs pickle code execution to load{what}; it is refused because a checkpoint "
            f"can run arbitrary code that way. Use a .safetensors version of the model, or re-save it as "
            f".safetensors with a tool you trust.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConfigError(f"{path}: cannot read as a PyTorch checkpoint: {e}") from None


def read_single_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an LDM `.safetensors` or `.ckpt`; a `.ckpt`'s `state_dict` wrapper is unwrapped.

    Metadata is the safetensors header's `__metadata__`, or for a .ckpt the wrapper's `global_step`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"single-file checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                check_single_file_keys(f.keys(), path)  # an SDXL file is refused before gigabytes are read
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: cannot read as .safetensors: {e}") from None
        return tensors, meta
    if suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ConfigError(f"{path}: expected a .safetensors or .ckpt file")
    obj, meta = _load_ckpt(path), {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("global_step"), int):
            meta["global_step"] = str(obj["global_step"])
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a dict of tensors (optionally under 'state_dict'), "
                          f"got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"{path}: contains no tensors")
    return tensors, meta


def _save_tensors(sd: dict[str, torch.Tensor], out_path: Path, fmt: Fmt, metadata: dict[str, str]) -> Path:
    if fmt == "safetensors":
        from safetensors.torch import save_file
        # safetensors refuses shared storage and non-contiguous views; every tensor gets its own buffer.
        sd = {k: v.contiguous() for k, v in sd.items()}
        return _atomic_write(out_path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt", **metadata}))
    if fmt == "ckpt":
        # The original releases wrap the weights in "state_dict"; every loader accepts that form.
        return _atomic_write(out_path, lambda tmp: torch.save({"state_dict": sd}, tmp))
    raise ConfigError(f"unknown format {fmt!r}: expected 'safetensors' or 'ckpt'")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers/transformers component's weights as saved by save_pretrained (safetensors, sharded, or .bin)."""
    from safetensors.torch import load_file
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for variant in ("", ".fp16"):
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return load_file(str(single))
            for ext in ("safetensors", "bin"):
                index = folder / f"{stem}{variant}.{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    out: dict[str, torch.Tensor] = {}
                    for shard in shards:
                        out.update(load_file(str(folder / shard)) if ext == "safetensors"
                                   else _load_ckpt(folder / shard))
                    return out
            binary = folder / f"{stem}{variant}.bin"
            if binary.is_file():
                return _load_ckpt(binary)
    raise ConfigError(f"{folder}: no model weights found (expected diffusion_pytorch_model.safetensors, "
                      f"model.safetensors or a .bin file)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


# --------------------------------------------------------------------------------------------------------------
# diffusers -> LDM key mapping
# --------------------------------------------------------------------------------------------------------------

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
         "mid_block.resnets.1.": "middle_block.2."}
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


def is_open_clip_text_config(config: dict) -> bool:
    """OpenCLIP (SD2) text towers use GELU; OpenAI's CLIP-L (SD1) uses QuickGELU (transformers' default)."""
    return config.get("hidden_act", "quick_gelu") == "gelu"


def clip_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """SD1: the HF CLIPTextModel state dict as the original release stored it (transformers 4.x names)."""
    out = {}
    for k, v in _strip_text_model(sd).items():
        if k == "embeddings.position_ids":
            continue  # re-added below in the release's form
        if k == "text_projection.weight":
            log.warning("text_encoder: dropping text_projection.weight; SD1's CLIP layout has no projection")
            continue
        out[CLIP_PREFIX + "text_model." + k] = v
    # The releases carry this buffer (persistent before transformers 4.31); some loaders still look for it.
    n = config.get("max_position_embeddings", 77)
    out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """SD2: diffusers' CLIPTextModel (N layers) -> OpenCLIP text tower (N + 1 resblocks), q/k/v fused to in_proj.

    SD2 releases hold 24 resblocks but condition on the penultimate one, which is why diffusers keeps 23. Web UIs
    expect all 24, so the last is written as a copy of the one before it (kohya does the same); nothing in SD2
    inference reads it. `text_projection` (identity) and `logit_scale` (log 100, where trained OpenCLIP models end)
    are likewise unused placeholders unless the folder has a real projection.
    """
    P, out, qkv, unknown = OPEN_CLIP_PREFIX, {}, {}, []
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
    for k in [k for k in out if k.startswith(last)]:
        out[f"{P}transformer.resblocks.{n}." + k[len(last):]] = out[k].clone()
    ref = out[P + "token_embedding.weight"]
    if P + "text_projection" not in out:
        out[P + "text_projection"] = torch.eye(ref.shape[1], dtype=ref.dtype)
    out[P + "logit_scale"] = torch.tensor(math.log(100.0), dtype=ref.dtype)
    return out


def text_encoder_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return open_clip_to_ldm(sd, config) if is_open_clip_text_config(config) else clip_to_ldm(sd, config)


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


def _cast(sd: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """Floating weights to fp16 or fp32. Schedule buffers stay fp32 (web UIs sample with alphas_cumprod, and fp16
    rounding of it changes images), the empty markers too (as ComfyUI writes them); integer buffers (position_ids)
    keep their dtype."""
    dtype = torch.float16 if half else torch.float32
    keep = (*SCHEDULE_BUFFERS, *MARKER_KEYS)
    return {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in sd.items()}


def _prediction_type(scheduler_config: dict) -> str:
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ConfigError(f"scheduler prediction_type {pred!r}: web UIs load only epsilon or v_prediction models")
    return pred


def _modelspec(version: str, pred: str, unet_config: dict, title: str) -> dict[str, str]:
    """Stability's ModelSpec header keys (informational; web UIs show them, import reads prediction_type)."""
    arch = "stable-diffusion-v1" if version == "sd1" else (
        "stable-diffusion-v2-768-v" if pred == "v_prediction" else "stable-diffusion-v2-512")
    px = int(unet_config.get("sample_size", 64)) * 8
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.title": title,
            "modelspec.resolution": f"{px}x{px}", "modelspec.prediction_type": "v" if pred == "v_prediction"
            else "epsilon"}


def _component_dirs(folder: Path, base_folder: Path | None, unet_subfolder: str) -> dict[str, Path]:
    """Where each part lives: in folder, else (parts a training checkpoint may not repeat) in base_folder."""
    if not folder.is_dir():
        raise ConfigError(f"diffusers model folder not found: {folder}")
    dirs, missing = {}, []
    for part, sub in (("unet", unet_subfolder), ("vae", "vae"), ("text_encoder", "text_encoder"),
                      ("scheduler", "scheduler")):
        found = next((d / sub for d in (folder, base_folder) if d is not None and (d / sub).is_dir()), None)
        if found is None:
            missing.append(sub + "/")
        dirs[part] = found
    if missing:
        where = f" or {base_folder}" if base_folder is not None else ""
        raise ConfigError(f"{folder}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}"
                          f"{where})")
    return dirs


def diffusers_folder_to_ldm(model_folder: Path, *, base_folder: Path | None = None, unet_subfolder: str = "unet"
                            ) -> tuple[dict[str, torch.Tensor], str, str, dict]:
    """(LDM state dict in the folder's dtypes, version 'sd1'|'sd2', prediction type, unet config)."""
    d = _component_dirs(Path(model_folder), None if base_folder is None else Path(base_folder), unet_subfolder)
    unet_cfg = _read_json(d["unet"] / "config.json")
    vae_cfg = _read_json(d["vae"] / "config.json")
    te_cfg = _read_json(d["text_encoder"] / "config.json")
    sched_cfg = _read_json(d["scheduler"] / "scheduler_config.json")
    sd = {**unet_to_ldm(_read_weights(d["unet"]), unet_cfg),
          **vae_to_ldm(_read_weights(d["vae"]), vae_cfg),
          **text_encoder_to_ldm(_read_weights(d["text_encoder"]), te_cfg),
          **schedule_buffers(sched_cfg)}
    version = "sd2" if is_open_clip_text_config(te_cfg) else "sd1"
    return sd, version, _prediction_type(sched_cfg), unet_cfg


def sidecar_name(version: str, prediction_type: str) -> str | None:
    """The shipped yaml that must sit next to an exported file, or None (SD1 epsilon: web UIs' default)."""
    return SIDECARS[(version, prediction_type)]


def save_single_file(model_folder: Path, out_path: Path, *, half: bool = True, fmt: Fmt = "safetensors",
                     base_folder: Path | None = None, unet_subfolder: str = "unet",
                     zero_terminal_snr: bool | None = None) -> Path:
    """Convert a diffusers SD1/SD2 folder (unet/, vae/, text_encoder/, scheduler/) into one LDM checkpoint.

    fp16 by default, fp32 with half=False. SD2 and v-prediction models also get `<stem>.yaml` next to the file
    (v2-inference.yaml, v2-inference-v.yaml or v1-inference-v.yaml), which web UIs need to pick the right config,
    and v-prediction models the empty `v_pred` marker tensor (utils/sd/ldm_markers.py). Every file is written
    atomically. Returns out_path.
    base_folder: where parts missing from model_folder (a checkpoint that saved only what it trains) are read.
    unet_subfolder: e.g. "ema_unet" to export the EMA weights instead.
    zero_terminal_snr: whether the model was trained with zero terminal SNR (writes the `ztsnr` marker); None:
    as the folder's scheduler config says (`rescale_betas_zero_snr`).
    """
    out_path = Path(out_path)
    if fmt not in ("safetensors", "ckpt"):
        raise ConfigError(f"unknown format {fmt!r}: expected 'safetensors' or 'ckpt'")
    want = "." + fmt
    if out_path.suffix.lower() != want:
        raise ConfigError(f"{out_path}: a {fmt} checkpoint must be named *{want}")
    sd, version, pred, unet_cfg = diffusers_folder_to_ldm(model_folder, base_folder=base_folder,
                                                          unet_subfolder=unet_subfolder)
    if zero_terminal_snr is None:
        d = _component_dirs(Path(model_folder), None if base_folder is None else Path(base_folder), unet_subfolder)
        zero_terminal_snr = bool(_read_json(d["scheduler"] / "scheduler_config.json").get("rescale_betas_zero_snr"))
    sd.update(marker_tensors(pred, zero_terminal_snr))
    _save_tensors(_cast(sd, half), out_path, fmt, _modelspec(version, pred, unet_cfg, out_path.stem))
    _write_sidecar(out_path, sidecar_name(version, pred))
    return out_path


def _write_sidecar(out_path: Path, name: str | None) -> None:
    sidecar = out_path.with_suffix(".yaml")
    if name is None:
        # A sidecar left from an earlier export under the same name would make web UIs load this model wrongly.
        shipped = {p.read_bytes() for p in CONFIG_DIR.glob("*.yaml")}
        if sidecar.is_file() and sidecar.read_bytes() in shipped:
            sidecar.unlink()
        return
    data = (CONFIG_DIR / name).read_bytes()
    _atomic_write(sidecar, lambda tmp: tmp.write_bytes(data))


# --------------------------------------------------------------------------------------------------------------
# LDM -> diffusers
# --------------------------------------------------------------------------------------------------------------

def detect_version(sd: dict[str, torch.Tensor], source: str | Path) -> str:
    """'sd1' or 'sd2' from the key layout; ConfigError naming the file and what was expected otherwise."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    check_single_file_keys(sd, source)  # SDXL and other SGM-layout files
    kind = infer_diffusers_model_type(sd)  # 'v1' is also its answer for anything it does not recognise
    if kind not in ("v1", "v2"):
        raise ConfigError(f"{source}: this looks like a '{kind}' checkpoint; only SD1.x and SD2.x text-to-image "
                          f"checkpoints are supported")
    unet_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    has_vae = any(k.startswith(VAE_PREFIX) for k in sd)
    clip1 = any(k.startswith(CLIP_PREFIX) for k in sd)
    clip2 = any(k.startswith(OPEN_CLIP_PREFIX) for k in sd)
    if unet_in is None or not has_vae or not (clip1 or clip2):
        prefixes = sorted({k.split(".")[0] for k in sd})[:8]
        lacking = [n for n, ok in (("model.diffusion_model.* (UNet)", unet_in is not None),
                                   ("first_stage_model.* (VAE)", has_vae),
                                   ("cond_stage_model.* (text encoder)", clip1 or clip2)) if not ok]
        raise ConfigError(
            f"{source}: not an SD1.x/SD2.x single-file checkpoint: lacks {', '.join(lacking)}. Expected "
            f"'model.diffusion_model.*', 'first_stage_model.*' and 'cond_stage_model.transformer.*' (SD1) or "
            f"'cond_stage_model.model.*' (SD2); found top-level names {', '.join(prefixes)}")
    if unet_in.ndim != 4 or unet_in.shape[1] != 4:
        raise ConfigError(f"{source}: the UNet takes {unet_in.shape[1]} input channels (inpainting/depth model?); "
                          f"only 4-channel text-to-image models are supported")
    return "sd2" if clip2 else "sd1"


def _yaml_prediction_type(yaml_path: Path) -> str:
    import yaml
    try:
        cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{yaml_path}: cannot read the LDM config sidecar: {e}") from None
    params = cfg.get("model", {}).get("params") if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) \
        else None
    if not isinstance(params, dict):
        raise ConfigError(f"{yaml_path}: not an LDM config (no model.params)")
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def resolve_prediction_type(path: Path, version: str, metadata: dict[str, str],
                            prediction_type: str | None, *, v_pred_marker: bool = False) -> str:
    """Explicit argument > `<stem>.yaml` sidecar > safetensors ModelSpec header > `v_pred` marker tensor > epsilon.

    The weights of SD2 512-base (epsilon) and 768-v (v_prediction) look alike, so an SD2 768-v file with no
    sidecar and no header needs the argument; the default follows what web UIs do without a sidecar.
    """
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        return prediction_type
    path = Path(path)
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file():
            return _yaml_prediction_type(sidecar)
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("v", "epsilon"):
        return "v_prediction" if spec == "v" else "epsilon"
    if v_pred_marker:
        return "v_prediction"
    if version == "sd2":
        log.warning("%s: SD2 file with no .yaml sidecar: assuming epsilon (SD2 512-base). For an SD2 768-v model "
                    "pass prediction_type='v_prediction' (CLI: --prediction_type v_prediction)", path)
    return "epsilon"


def load_original_config(version: str, prediction_type: str) -> dict:
    import yaml
    return yaml.safe_load((CONFIG_DIR / IMPORT_YAMLS[(version, prediction_type)]).read_text(encoding="utf-8"))


def diffusers_configs_from_ldm(original_config: dict, sd: dict[str, torch.Tensor], version: str) -> tuple[dict, dict]:
    """UNet and VAE configs through diffusers' own LDM-config readers; sample sizes from the yaml, not guessed."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    unet = create_unet_diffusers_config_from_ldm(original_config, sd)
    vae = create_vae_diffusers_config_from_ldm(original_config, sd)
    latent = int(original_config["model"]["params"]["image_size"])
    ch_mult = original_config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]
    unet["sample_size"], vae["sample_size"] = latent, latent * 2 ** (len(ch_mult) - 1)
    if version == "sd2":
        unet["upcast_attention"] = True  # SD2.1 overflows fp16 attention without it (diffusers sets it for 2.1)
    return unet, vae


def ldm_to_unet(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    return convert_ldm_unet_checkpoint(sd, config)


def ldm_to_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    return convert_ldm_vae_checkpoint(sd, config)


def ldm_to_text_encoder(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict in transformers 5.x naming (no `text_model.` prefix), whichever layout the file has."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        out = _strip_text_model(convert_open_clip_checkpoint(stub, sd, prefix=OPEN_CLIP_PREFIX))
        n = config["num_hidden_layers"]

        def keep(k: str) -> bool:  # the unused last resblock, the projection and logit_scale have no place here
            m = re.match(r"encoder\.layers\.(\d+)\.", k)
            return not (m and int(m[1]) >= n) and k != "text_projection.weight"
        out = {k: v for k, v in out.items() if keep(k)}
    else:
        # Some tools already write 5.x names under cond_stage_model.transformer.; stripping covers both.
        out = _strip_text_model(convert_ldm_clip_checkpoint(sd))
    out.pop("embeddings.position_ids", None)  # a non-persistent buffer in transformers 5.x
    return out


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, source: str | Path) -> None:
    """Every tensor must land: a wrong config or a foreign file is an error here, not a silently random layer."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {', '.join(extra[:2])})" if extra else "",
                 f"{len(wrong)} with another shape (e.g. {wrong[0]}: file {tuple(sd[wrong[0]].shape)}, "
                 f"model {tuple(expected[wrong[0]].shape)})" if wrong else ""]
        raise ConfigError(f"{source}: {what} does not match the expected architecture: "
                          f"{'; '.join(p for p in parts if p)}")
    model.load_state_dict(sd, strict=True, assign=True)


def write_clip_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>", max_length: int = 77) -> Path:
    """The real CLIP BPE tokenizer (vocab 49408) from the shipped merge list, in the files CLIPTokenizer loads.

    vocab = the 256 byte symbols in CLIP's byte-to-unicode order, the same with `</w>`, one entry per merge (in
    merge order), then <|startoftext|> and <|endoftext|>; merges = lines 1..48894 of the file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408 or len(set(vocab)) != 49408:
        raise RuntimeError(f"{BPE_FILE}: expected 49408 distinct tokens, built {len(set(vocab))}")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False, **specials}, indent=2), encoding="utf-8")
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte table in its own order: printable bytes first (as themselves), then the other 68 mapped to
    chr(256 + n). The order matters: it fixes the first 256 token ids ('a' is 64, 'a</w>' 320)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return table


def _scheduler_config(original_config: dict, prediction_type: str, keys=()) -> dict:
    """The yaml's noise schedule; a `ztsnr` marker among `keys` adds the zero-terminal-SNR settings."""
    p = original_config["model"]["params"]
    return dict(beta_schedule="scaled_linear", beta_start=float(p.get("linear_start", 0.00085)),
                beta_end=float(p.get("linear_end", 0.012)), num_train_timesteps=int(p.get("timesteps", 1000)),
                clip_sample=False, steps_offset=1, prediction_type=prediction_type, **ztsnr_scheduler_config(keys))


def write_diffusers_folder(sd: dict[str, torch.Tensor], out_folder: Path, *, unet_config: dict, vae_config: dict,
                           text_config: dict, scheduler_config: dict, tokenizer_from: Path | None = None,
                           pad_token: str = "<|endoftext|>", overwrite: bool = False,
                           source: str | Path = "checkpoint") -> Path:
    """Convert an LDM state dict with the given diffusers configs and write a loadable pipeline folder.

    Written under a temp name beside out_folder, then renamed, so an interrupted import leaves nothing half-done.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_folder = Path(out_folder)
    if out_folder.exists() and any(out_folder.iterdir()) and not overwrite:
        raise ConfigError(f"{out_folder}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    # Built on the meta device and filled by assignment: no random init, no second copy of the weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    _load_strict(unet, ldm_to_unet(sd, unet_config), "UNet", source)
    _load_strict(vae, ldm_to_vae(sd, vae_config), "VAE", source)
    _load_strict(text_encoder, ldm_to_text_encoder(sd, text_config), "text encoder", source)

    out_folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out_folder)
    tmp.mkdir()
    try:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder")
        DDPMScheduler(**scheduler_config).save_pretrained(tmp / "scheduler")
        if tokenizer_from is not None:
            shutil.copytree(tokenizer_from, tmp / "tokenizer")
        else:
            write_clip_tokenizer(tmp / "tokenizer", pad_token=pad_token,
                                 max_length=text_config.get("max_position_embeddings", 77))
        import diffusers
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2), encoding="utf-8")
        match_umask(tmp)  # save_pretrained's safetensors files are created 0600
        if out_folder.exists():
            old = out_folder.with_name(f".{out_folder.name}.old-{os.getpid()}")
            os.replace(out_folder, old)
            os.replace(tmp, out_folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_folder


def single_file_to_diffusers(path: Path, out_folder: Path, *, prediction_type: str | None = None,
                             config_folder: Path | None = None, overwrite: bool = False) -> Path:
    """Convert an SD1.x / SD2.x LDM `.safetensors` or `.ckpt` into a diffusers folder, offline.

    The version comes from the keys (SD2: `cond_stage_model.model.*`). The prediction type comes from the
    argument, else a `<stem>.yaml` sidecar (`parameterization: "v"`), else the file's ModelSpec header, else its
    `v_pred` marker, else epsilon, so an SD2 768-v file with none of these needs prediction_type="v_prediction".
    A `ztsnr` marker sets `rescale_betas_zero_snr` and trailing timesteps in the scheduler config.
    config_folder: a diffusers folder whose unet/vae/text_encoder configs (and tokenizer/, if any) describe a
    non-standard architecture; by default the shipped LDM yamls and the release CLIP configs are used.
    Returns out_folder, which `StableDiffusionPipeline.from_pretrained` loads with HF_HUB_OFFLINE=1.
    """
    path = Path(path)
    sd, meta = read_single_file(path)
    version = detect_version(sd, path)
    pred = resolve_prediction_type(path, version, meta, prediction_type, v_pred_marker=V_PRED in sd)
    original_config = load_original_config(version, pred)
    tokenizer_from = None
    if config_folder is not None:
        config_folder = Path(config_folder)
        unet_cfg = _read_json(config_folder / "unet" / "config.json")
        vae_cfg = _read_json(config_folder / "vae" / "config.json")
        text_cfg = _read_json(config_folder / "text_encoder" / "config.json")
        if (config_folder / "tokenizer").is_dir():
            tokenizer_from = config_folder / "tokenizer"
    else:
        unet_cfg, vae_cfg = diffusers_configs_from_ldm(original_config, sd, version)
        text_cfg = dict(TEXT_CONFIGS[version])
    return write_diffusers_folder(sd, out_folder, unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg,
                                  scheduler_config=_scheduler_config(original_config, pred, sd),
                                  tokenizer_from=tokenizer_from, pad_token=PAD_TOKENS[version], overwrite=overwrite,
                                  source=path)


# --------------------------------------------------------------------------------------------------------------
# Pruning (EveryDream1's prune_ckpt: drop EMA and optimizer state, keep the model weights, halve)
# --------------------------------------------------------------------------------------------------------------

def prune_state_dict(sd: dict[str, torch.Tensor], *, half: bool = True, use_ema: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Keep the UNet, VAE, text encoder, schedule buffers and markers; drop `model_ema.*` and everything else.

    use_ema: take the UNet weights from the EMA copy, which LDM stores flattened
    (`model.diffusion_model.a.b.weight` -> `model_ema.diffusion_modelabweight`).
    """
    out = {k: v for k, v in sd.items() if k.startswith(MODEL_PREFIXES) or k in SCHEDULE_BUFFERS or k in MARKER_KEYS}
    if use_ema:
        flat = {k: "model_ema." + "".join(k.split(".")[1:]) for k in out if k.startswith(UNET_PREFIX)}
        absent = [k for k, e in flat.items() if e not in sd]
        if absent:
            raise ConfigError(f"use_ema: the file has no EMA weights ({len(absent)} of {len(flat)} UNet tensors "
                              f"lack a model_ema.* copy, e.g. {flat[absent[0]]})")
        out.update({k: sd[e] for k, e in flat.items()})
    return _cast(out, half)


def prune_single_file(in_path: Path, out_path: Path, *, half: bool = True, use_ema: bool = False,
                      fmt: Fmt | None = None) -> Path:
    """Write a pruned copy of an SD1/SD2 single file (format from out_path's suffix unless fmt is given)."""
    in_path, out_path = Path(in_path), Path(out_path)
    sd, meta = read_single_file(in_path)
    detect_version(sd, in_path)
    fmt = fmt or ("ckpt" if out_path.suffix.lower() == ".ckpt" else "safetensors")
    if out_path.suffix.lower() != (".ckpt" if fmt == "ckpt" else ".safetensors"):
        raise ConfigError(f"{out_path}: a {fmt} checkpoint must be named *.{fmt}")
    if out_path.resolve() == in_path.resolve():
        raise ConfigError(f"{out_path}: choose an output path other than the input")
    pruned = prune_state_dict(sd, half=half, use_ema=use_ema)
    keep = {k: v for k, v in meta.items() if k.startswith("modelspec.")}
    _save_tensors(pruned, out_path, fmt, keep)
    log.info("pruned %s: kept %d of %d tensors", in_path, len(pruned), len(sd))
    return out_path


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.convert_ldm",
                                description="Convert Stable Diffusion 1.x/2.x between diffusers folders and "
                                            "single-file LDM checkpoints (offline).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-single", help="diffusers folder -> .safetensors/.ckpt (+ .yaml sidecar for SD2 / v)")
    a.add_argument("model_folder", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--fp32", action="store_true", help="keep full precision (default: fp16)")
    a.add_argument("--ckpt", action="store_true", help="write a pickled .ckpt instead of .safetensors")
    a.add_argument("--base", type=Path, default=None,
                   help="diffusers folder to take parts missing from model_folder from (e.g. vae/, scheduler/)")
    a.add_argument("--unet-subfolder", default="unet", help="UNet subfolder to export, e.g. ema_unet")
    a.add_argument("--zero-terminal-snr", action="store_const", const=True, default=None,
                   help="mark the model as trained with zero terminal SNR (ztsnr); default: as its scheduler config says")
    b = sub.add_parser("to-diffusers", help=".safetensors/.ckpt -> diffusers folder")
    b.add_argument("file", type=Path)
    b.add_argument("out_folder", type=Path)
    b.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the sidecar yaml; needed for SD2 768-v files that come without one")
    b.add_argument("--overwrite", action="store_true", help="replace out_folder if it exists")
    c = sub.add_parser("prune", help="drop EMA/optimizer state from a single file and halve it")
    c.add_argument("file", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--fp32", action="store_true", help="keep full precision (default: fp16)")
    c.add_argument("--use-ema", action="store_true", help="keep the EMA UNet weights instead of the trained ones")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits with code 2 on bad usage
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "to-single":
            fmt: Fmt = "ckpt" if args.ckpt or args.out.suffix.lower() == ".ckpt" else "safetensors"
            out = save_single_file(args.model_folder, args.out, half=not args.fp32, fmt=fmt, base_folder=args.base,
                                   unet_subfolder=args.unet_subfolder, zero_terminal_snr=args.zero_terminal_snr)
            sidecar = out.with_suffix(".yaml")
            print(f"wrote {out}" + (f" and {sidecar}" if sidecar.is_file() else ""))
        elif args.command == "to-diffusers":
            out = single_file_to_diffusers(args.file, args.out_folder, prediction_type=args.prediction_type,
                                           overwrite=args.overwrite)
            print(f"wrote {out}")
        else:
            out = prune_single_file(args.file, args.out, half=not args.fp32, use_ema=args.use_ema)
            print(f"wrote {out}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
