"""Find and load the Stable Diffusion parts: UNet, CLIP text encoder, VAE, tokenizer, noise-scheduler config.

Every source ends as a local diffusers folder before anything is loaded, so there is one loading path:
a local folder as is, a hub id through huggingface_hub's snapshot download (only when the user names one),
a single LDM file converted offline, and the built-in models written by utils/sd/builtin_models.py.
SD1 vs SD2 and epsilon vs v-prediction are read from the folder's configs: data, not code paths.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.core.config_schema import ConfigError, read_json
from utils.sd.builtin_models import BUILTIN_PREFIX, BUILTINS, builtin_folder
from utils.sd.families import ModelFamily, family_of_folder
from utils.sd.model_arch import check_diffusers_folder

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class SDModel:
    folder: Path                  # the local diffusers folder everything was loaded from
    unet: torch.nn.Module
    text_encoders: tuple          # in the family's order (text_encoder, text_encoder_2, ...)
    vae: torch.nn.Module
    tokenizers: tuple             # each text encoder's own
    scheduler_config: dict        # the model's own noise-scheduler config, class name included
    prediction_type: str          # "epsilon" or "v_prediction"
    family: ModelFamily           # SD1.x, SD2.x, SDXL: from the text encoders' configs (utils/sd/families.py)

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (SD1/SD2's only one)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def text_encoder_parts(self) -> list[tuple[str, torch.nn.Module]]:
        """(diffusers subfolder, module) of each text encoder, e.g. [("text_encoder", ...), ("text_encoder_2", ...)]."""
        return [(spec.subfolder, module) for spec, module in zip(self.family.text_encoders, self.text_encoders)]

    def tokenizer_parts(self) -> list[tuple[str, object]]:
        """(diffusers subfolder, tokenizer) of each text encoder's tokenizer."""
        return [(spec.tokenizer_subfolder, tok) for spec, tok in zip(self.family.text_encoders, self.tokenizers)]


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "text_encoder").is_dir()


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text


def resolve_model_folder(source: str, cache_root: Path, prediction_type: str | None = None) -> Path:
    """Turn resume_ckpt into a local diffusers folder, or raise ConfigError saying what is wrong and how to fix it."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"resume_ckpt: unknown built-in model '{name}'; choose one of: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        return builtin_folder(name, cache_root / "builtin")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from utils.sd.ldm_import import single_file_to_diffusers
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{prediction_type}".encode())
        out = cache_root / "converted" / f"{path.stem}-{key.hexdigest()[:10]}"
        if not (out / "model_index.json").exists():
            single_file_to_diffusers(path, out, prediction_type=prediction_type)
        return out
    if path.exists():
        if _is_diffusers_folder(path):
            check_diffusers_folder(path)  # SDXL and other families: refused by their configs, not at the first step
            return path
        raise ConfigError(f"resume_ckpt: {path} is not a diffusers model folder (expected unet/ and "
                          f"text_encoder/ inside it) nor a .safetensors/.ckpt file")
    if _looks_like_hub_id(source):
        return _download_from_hub(source)
    raise ConfigError(f"resume_ckpt: {source} does not exist; give a diffusers folder, a .safetensors/.ckpt "
                      f"file, a hub id like owner/name, 'findlast', or 'builtin:tiny-sd'")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["model_index.json", "unet/*", "text_encoder/*", "vae/*", "tokenizer/*", "scheduler/*"]

    def download(allow_patterns: list[str]) -> Path:
        try:
            # Only the diffusers parts, and safetensors weights where the repo has them.
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=[
                "*.bin", "*.ckpt", "*fp16*", "*.msgpack", "*.onnx*"], local_files_only=offline))
        except Exception as e:  # the hub client raises many kinds; all mean "not available here"
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
            raise ConfigError(f"resume_ckpt: cannot get hub model '{repo_id}' ({why}); download it once with "
                              f"network access or give a local diffusers folder") from None
    # the configs first: a model of another family (SDXL) is refused before gigabytes of its weights come down
    check_diffusers_folder(download(["model_index.json", "unet/config.json"]))
    folder = download(patterns)
    if not _is_diffusers_folder(folder) or not any((folder / "unet").glob("*.safetensors")):
        raise ConfigError(f"resume_ckpt: hub model '{repo_id}' has no diffusers UNet/text encoder in safetensors")
    return folder


def load_sd_model(folder: Path, prediction_type: str | None = None) -> SDModel:
    """Load the parts from a local diffusers folder (fp32; the trainer casts what it does not train): UNet, VAE,
    and the family's text encoders with their tokenizers. prediction_type overrides the scheduler config's (for
    folders converted without the right setting)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    check_diffusers_folder(folder)  # whatever the folder's origin (findlast, ema_resume_model): before any weight
    family = family_of_folder(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
        text_encoders = tuple(getattr(transformers, spec.transformers_class).from_pretrained(
            folder, subfolder=spec.subfolder, torch_dtype=torch.float32) for spec in family.text_encoders)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=spec.tokenizer_subfolder)
                           for spec in family.text_encoders)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"cannot load the model in {folder}: {e}") from None
    for spec, tokenizer, text_encoder in zip(family.text_encoders, tokenizers, text_encoders):
        if len(tokenizer) > text_encoder.config.vocab_size:  # its ids would index past the embedding table
            raise ConfigError(f"{folder / spec.tokenizer_subfolder}: the tokenizer has {len(tokenizer)} tokens, but "
                              f"{spec.subfolder} embeds only {text_encoder.config.vocab_size}: it is not this text "
                              f"encoder's tokenizer; put the model's own tokenizer there")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(sched_path, "scheduler config") if sched_path.exists() else {}
    if prediction_type:
        scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"{sched_path}: prediction_type '{prediction_type}' is not supported "
                          f"(epsilon or v_prediction)")
    return SDModel(folder=Path(folder), unet=unet, text_encoders=text_encoders, vae=vae, tokenizers=tokenizers,
                   scheduler_config=scheduler_config, prediction_type=prediction_type, family=family)
