"""diffusers folder -> original LDM single file (`save_single_file`), offline.

Writes what AUTOMATIC1111, Forge, ComfyUI and diffusers' own `from_single_file` load: `model.diffusion_model.*`
(UNet; SDXL's added embedding as `label_emb`), `first_stage_model.*` (VAE, attention projections as 1x1
convolutions), the text encoders in their family's single-file layout (SD1: `cond_stage_model.transformer.text_model.*`,
CLIP ViT-L/14 as the original release stored it; SD2: `cond_stage_model.model.*`, OpenCLIP ViT-H/14; SDXL:
`conditioner.embedders.0.transformer.text_model.*` and `conditioner.embedders.1.model.*`, OpenCLIP ViT-bigG/14 with
its projection), the LDM noise-schedule buffers, and where the family record names one a `<stem>.yaml` sidecar (SD2,
v-prediction), without which web UIs render an SD2 768-v model as noise. The header carries ModelSpec keys and the
diffusers configs of the parts (DIFFUSERS_CONFIGS_KEY), from which import rebuilds a non-release architecture.
"""
from __future__ import annotations

from pathlib import Path

import json

import torch

from utils.core.config_schema import ConfigError, read_json
from utils.core.file_writes import write_atomic
from utils.sd.families import CONFIG_DIR, PREDICTION_TYPES, ModelFamily, family_from_text_configs
from utils.sd.ldm_files import Fmt, cast_weights, read_weights, save_tensors
from utils.sd.ldm_keys import schedule_buffers, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from utils.sd.ldm_markers import marker_tensors

# Header key holding {"unet": ..., "vae": ..., "<text encoder subfolder>": ...}: the diffusers configs of the exported
# parts, as JSON. Web UIs ignore it; ldm_import reads it back, so a model of any size converts both ways.
DIFFUSERS_CONFIGS_KEY = "diffusers.configs"
# Header key holding {"<tokenizer subfolder>": {"<file name>": "<text>"}}: the tokenizer files of text encoders whose
# vocabulary is not CLIP's (the built-in tiny models' character-level one), which import cannot rebuild from the
# shipped CLIP BPE. Real SD files never need it.
TOKENIZERS_KEY = "diffusers.tokenizers"
CLIP_VOCAB_SIZE = 49408


def _prediction_type(scheduler_config: dict) -> str:
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler prediction_type {pred!r}: web UIs load only epsilon or v_prediction models")
    return pred


def _modelspec(family: ModelFamily, pred: str, unet_config: dict, title: str) -> dict[str, str]:
    """Stability's ModelSpec header keys (informational; web UIs show them, import reads prediction_type)."""
    arch = family.prediction[pred].modelspec_architecture
    px = int(unet_config.get("sample_size", 64)) * 8
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.title": title,
            "modelspec.resolution": f"{px}x{px}", "modelspec.prediction_type": "v" if pred == "v_prediction"
            else "epsilon"}


def _component_dirs(folder: Path, base_folder: Path | None, unet_subfolder: str
                    ) -> tuple[dict[str, Path], ModelFamily]:
    """Where each part lives: in folder, else (parts a training checkpoint may not repeat) in base_folder; and the
    family, from the text encoders' configs (text_encoder/, text_encoder_2/, ...)."""
    if not folder.is_dir():
        raise ConfigError(f"diffusers model folder not found: {folder}")
    roots = [d for d in (folder, base_folder) if d is not None]
    encoders = ["text_encoder"] + sorted({p.name for r in roots for p in r.glob("text_encoder_*") if p.is_dir()})
    wanted = {"unet": unet_subfolder, "vae": "vae", "scheduler": "scheduler", **{e: e for e in encoders}}
    dirs = {part: next((r / sub for r in roots if (r / sub).is_dir()), None) for part, sub in wanted.items()}
    missing = [wanted[part] + "/" for part, d in dirs.items() if d is None]
    if missing:
        where = f" or {base_folder}" if base_folder is not None else ""
        raise ConfigError(f"{folder}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}"
                          f"{where})")
    configs = [read_json(dirs[e] / "config.json", "text encoder config") for e in encoders]
    return dirs, family_from_text_configs(configs, folder)


def diffusers_folder_to_ldm(model_folder: Path, *, base_folder: Path | None = None, unet_subfolder: str = "unet"
                            ) -> tuple[dict[str, torch.Tensor], ModelFamily, str, dict]:
    """(LDM state dict in the folder's dtypes, model family, prediction type, diffusers configs by part)."""
    d, family = _component_dirs(Path(model_folder), None if base_folder is None else Path(base_folder),
                                unet_subfolder)
    configs = {"unet": read_json(d["unet"] / "config.json", "UNet config"),
               "vae": read_json(d["vae"] / "config.json", "VAE config"),
               **{e.subfolder: read_json(d[e.subfolder] / "config.json", "text encoder config")
                  for e in family.text_encoders}}
    sched_cfg = read_json(d["scheduler"] / "scheduler_config.json", "scheduler config")
    sd = {**unet_to_ldm(read_weights(d["unet"]), configs["unet"]),
          **vae_to_ldm(read_weights(d["vae"]), configs["vae"]),
          **schedule_buffers(sched_cfg)}
    for e in family.text_encoders:
        sd.update(text_encoder_to_ldm(read_weights(d[e.subfolder]), configs[e.subfolder], e))
    return sd, family, _prediction_type(sched_cfg), {**configs, "scheduler": sched_cfg}


def _configs_header(configs: dict) -> dict[str, str]:
    keep = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in configs.items() if k != "scheduler"}
    return {DIFFUSERS_CONFIGS_KEY: json.dumps(keep, sort_keys=True)}


def _tokenizers_header(folder: Path, base_folder: Path | None, family: ModelFamily, configs: dict) -> dict[str, str]:
    """TOKENIZERS_KEY for the text encoders whose vocabulary is not CLIP's (nothing for real SD models)."""
    files = {}
    for e in family.text_encoders:
        if configs[e.subfolder].get("vocab_size", CLIP_VOCAB_SIZE) == CLIP_VOCAB_SIZE:
            continue
        tok = next((r / e.tokenizer_subfolder for r in (folder, base_folder)
                    if r is not None and (r / e.tokenizer_subfolder).is_dir()), None)
        if tok is not None:
            files[e.tokenizer_subfolder] = {p.name: p.read_text(encoding="utf-8") for p in sorted(tok.iterdir())
                                            if p.is_file()}
    return {TOKENIZERS_KEY: json.dumps(files, sort_keys=True)} if files else {}


def sidecar_name(family: ModelFamily, prediction_type: str) -> str | None:
    """The shipped yaml that must sit next to an exported file, or None (SD1 epsilon: web UIs' default)."""
    return family.prediction[prediction_type].sidecar


def save_single_file(model_folder: Path, out_path: Path, *, half: bool = True, fmt: Fmt = "safetensors",
                     base_folder: Path | None = None, unet_subfolder: str = "unet",
                     zero_terminal_snr: bool | None = None) -> Path:
    """Convert a diffusers SD1/SD2/SDXL folder (unet/, vae/, text_encoder/ [, text_encoder_2/], scheduler/) into one
    LDM (SDXL: SGM) checkpoint.

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
    sd, family, pred, configs = diffusers_folder_to_ldm(model_folder, base_folder=base_folder,
                                                        unet_subfolder=unet_subfolder)
    if zero_terminal_snr is None:
        zero_terminal_snr = bool(configs["scheduler"].get("rescale_betas_zero_snr"))
    sd.update(marker_tensors(pred, zero_terminal_snr))
    header = {**_modelspec(family, pred, configs["unet"], out_path.stem), **_configs_header(configs),
              **_tokenizers_header(Path(model_folder), base_folder, family, configs)}
    save_tensors(cast_weights(sd, half), out_path, fmt, header)
    _write_sidecar(out_path, sidecar_name(family, pred))
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
    write_atomic(sidecar, lambda tmp: tmp.write_bytes(data))

