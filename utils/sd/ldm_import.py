"""Original LDM single file (.safetensors / .ckpt) -> diffusers folder (`single_file_to_diffusers`), offline.

The family (utils/sd/families.py) comes from the file's keys, the prediction type from the argument, a sidecar, the
header or a marker. The conversion goes through diffusers' own LDM->diffusers functions, with the diffusers configs
our exporter wrote into the header (any architecture, the tiny test models included), else the UNet/VAE configs
derived from the yaml files shipped in utils/sd/ldm_configs/ and the release text-encoder configs of the family
record, and the real CLIP BPE tokenizer generated from the merge list shipped there: nothing is fetched from a hub.
"""
from __future__ import annotations

import gzip
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from utils.core.config_schema import ConfigError, read_json
from utils.core.file_writes import replace_folder_atomic
from utils.sd.families import CONFIG_DIR, PREDICTION_TYPES, ModelFamily, family_from_keys
from utils.sd.ldm_export import CLIP_VOCAB_SIZE, DIFFUSERS_CONFIGS_KEY, TOKENIZERS_KEY
from utils.sd.ldm_files import read_single_file
from utils.sd.ldm_keys import in_model_naming, ldm_to_text_encoder, ldm_to_unet, ldm_to_vae
from utils.sd.ldm_markers import V_PRED, ztsnr_scheduler_config

log = logging.getLogger(__name__)

BPE_FILE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"


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
    # LDM yamls (SD1/SD2) say parameterization: "v"; SGM yamls (SDXL) name a V-scaling denoiser.
    scaling = ((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}
    v = params.get("parameterization") == "v" or "VScaling" in str(scaling.get("target", ""))
    return "v_prediction" if v else "epsilon"


def resolve_prediction_type(path: Path, family: ModelFamily, metadata: dict[str, str],
                            prediction_type: str | None, *, v_pred_marker: bool = False) -> str:
    """Explicit argument > `<stem>.yaml` sidecar > safetensors ModelSpec header > `v_pred` marker tensor > epsilon.

    The weights of SD2 512-base (epsilon) and 768-v (v_prediction) look alike, so an SD2 768-v file with no
    sidecar and no header needs the argument; the default follows what web UIs do without a sidecar.
    """
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
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
    if family.no_sidecar_warning:
        log.warning("%s: %s", path, family.no_sidecar_warning)
    return "epsilon"


def load_original_config(family: ModelFamily, prediction_type: str) -> dict:
    """The shipped LDM config a single file of this family and prediction type is imported with."""
    import yaml
    name = family.prediction[prediction_type].import_yaml
    return yaml.safe_load((CONFIG_DIR / name).read_text(encoding="utf-8"))


def diffusers_configs_from_ldm(original_config: dict, sd: dict[str, torch.Tensor], family: ModelFamily
                               ) -> tuple[dict, dict]:
    """UNet and VAE configs through diffusers' own LDM-config readers; sample sizes from the yaml, not guessed."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    unet = create_unet_diffusers_config_from_ldm(original_config, sd)
    vae = create_vae_diffusers_config_from_ldm(original_config, sd)
    # SGM yamls (SDXL) name no image size: SDXL base is trained at 1024 px, 128 latent pixels.
    latent = int(original_config["model"]["params"].get("image_size", 128))
    ch_mult = original_config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]
    unet["sample_size"], vae["sample_size"] = latent, latent * 2 ** (len(ch_mult) - 1)
    if family.upcast_attention:
        unet["upcast_attention"] = True
    return unet, vae



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
                           text_configs: dict[str, dict], scheduler_config: dict,
                           tokenizers_from: dict[str, Path] | None = None, family: ModelFamily,
                           overwrite: bool = False, source: str | Path = "checkpoint") -> Path:
    """Convert an LDM state dict with the given diffusers configs (text_configs: by text-encoder subfolder) and write
    a loadable pipeline folder. tokenizers_from: tokenizer folders to copy, by tokenizer subfolder; the others are
    the real CLIP tokenizer with the family's padding.

    Written under a temp name beside out_folder, then renamed, so an interrupted import leaves nothing half-done.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    out_folder = Path(out_folder)
    if out_folder.exists() and any(out_folder.iterdir()) and not overwrite:
        raise ConfigError(f"{out_folder}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    tokenizers_from = tokenizers_from or {}
    # Built on the meta device and filled by assignment: no random init, no second copy of the weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoders = [getattr(transformers, e.transformers_class)(transformers.CLIPTextConfig.from_dict(
            text_configs[e.subfolder])) for e in family.text_encoders]
    _load_strict(unet, ldm_to_unet(sd, unet_config), "UNet", source)
    _load_strict(vae, ldm_to_vae(sd, vae_config), "VAE", source)
    for e, model in zip(family.text_encoders, encoders):
        te_sd = in_model_naming(ldm_to_text_encoder(sd, text_configs[e.subfolder], e), model.state_dict())
        _load_strict(model, te_sd, f"text encoder {e.subfolder}", source)

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        DDPMScheduler(**scheduler_config).save_pretrained(tmp / "scheduler")
        index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
                 **family.pipeline_extras, "scheduler": ["diffusers", "DDPMScheduler"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        if len(family.text_encoders) == 1:  # the SD1/SD2 pipeline's optional parts, as diffusers writes them
            index.update({"feature_extractor": [None, None], "requires_safety_checker": False,
                          "safety_checker": [None, None]})
        for e, model in zip(family.text_encoders, encoders):
            model.save_pretrained(tmp / e.subfolder)
            tok = tmp / e.tokenizer_subfolder
            if e.tokenizer_subfolder in tokenizers_from:
                shutil.copytree(tokenizers_from[e.tokenizer_subfolder], tok)
            else:
                write_clip_tokenizer(tok, pad_token=e.pad_token,
                                     max_length=text_configs[e.subfolder].get("max_position_embeddings", 77))
            index[e.subfolder] = ["transformers", e.transformers_class]
            index[e.tokenizer_subfolder] = ["transformers", "CLIPTokenizer"]
        (tmp / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2), encoding="utf-8")
    return replace_folder_atomic(out_folder, write)


def _header_configs(meta: dict[str, str], family: ModelFamily, source: Path) -> dict | None:
    """The diffusers configs our exporter wrote into the header (ldm_export.DIFFUSERS_CONFIGS_KEY), or None."""
    text = meta.get(DIFFUSERS_CONFIGS_KEY)
    if text is None:
        return None
    try:
        configs = json.loads(text)
    except json.JSONDecodeError:
        configs = None
    wanted = {"unet", "vae", *(e.subfolder for e in family.text_encoders)}
    if not isinstance(configs, dict) or not wanted <= set(configs):
        log.warning("%s: header %s is not what this exporter writes; using the release configs", source,
                    DIFFUSERS_CONFIGS_KEY)
        return None
    return configs


def single_file_to_diffusers(path: Path, out_folder: Path, *, prediction_type: str | None = None,
                             config_folder: Path | None = None, overwrite: bool = False) -> Path:
    """Convert an SD1.x / SD2.x LDM or SDXL SGM `.safetensors` or `.ckpt` into a diffusers folder, offline.

    The family comes from the keys (SD2: `cond_stage_model.model.*`; SDXL: `conditioner.embedders.0/1.*`). The
    prediction type comes from the argument, else a `<stem>.yaml` sidecar (`parameterization: "v"`, or a V-scaling
    denoiser), else the file's ModelSpec header, else its `v_pred` marker, else epsilon, so an SD2 768-v file with
    none of these needs prediction_type="v_prediction". A `ztsnr` marker sets `rescale_betas_zero_snr` and trailing
    timesteps in the scheduler config.
    The architecture comes from config_folder (a diffusers folder whose unet/vae/text_encoder* configs, and
    tokenizer*/ if any, describe it), else from the diffusers configs in the header of a file this project
    exported, else from the shipped yamls and the family's release text-encoder configs.
    Returns out_folder, which the family's pipeline class loads with HF_HUB_OFFLINE=1.
    """
    path = Path(path)
    sd, meta = read_single_file(path)
    family = family_from_keys(sd, path)
    pred = resolve_prediction_type(path, family, meta, prediction_type, v_pred_marker=V_PRED in sd)
    original_config = load_original_config(family, pred)
    tokenizers_from: dict[str, Path] = {}
    header = _header_configs(meta, family, path)
    if config_folder is not None:
        config_folder = Path(config_folder)
        configs = {part: read_json(config_folder / part / "config.json", f"{part} config")
                   for part in ("unet", "vae", *(e.subfolder for e in family.text_encoders))}
        tokenizers_from = {e.tokenizer_subfolder: config_folder / e.tokenizer_subfolder for e in family.text_encoders
                           if (config_folder / e.tokenizer_subfolder).is_dir()}
    elif header is not None:
        configs = header
    else:
        unet_cfg, vae_cfg = diffusers_configs_from_ldm(original_config, sd, family)
        configs = {"unet": unet_cfg, "vae": vae_cfg,
                   **{e.subfolder: dict(e.import_config) for e in family.text_encoders}}
    with tempfile.TemporaryDirectory() as scratch:
        for e in family.text_encoders:
            if e.tokenizer_subfolder in tokenizers_from:
                continue
            if (files := _header_tokenizer(meta, e.tokenizer_subfolder)) is not None:
                tokenizers_from[e.tokenizer_subfolder] = folder = Path(scratch) / e.tokenizer_subfolder
                folder.mkdir()
                for name, text in files.items():
                    (folder / Path(name).name).write_text(text, encoding="utf-8")
            elif configs[e.subfolder].get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
                raise ConfigError(f"{path}: {e.subfolder} has a {configs[e.subfolder]['vocab_size']}-token "
                                  f"vocabulary, not CLIP's {CLIP_VOCAB_SIZE}, and the file carries no tokenizer for "
                                  f"it; convert it with a diffusers folder of the same model (python -m "
                                  f"utils.convert_ldm to-diffusers {path} <out> --config_folder <that folder>)")
        return write_diffusers_folder(sd, out_folder, unet_config=configs["unet"], vae_config=configs["vae"],
                                      text_configs=configs,
                                      scheduler_config=_scheduler_config(original_config, pred, sd),
                                      tokenizers_from=tokenizers_from, family=family, overwrite=overwrite,
                                      source=path)


def _header_tokenizer(meta: dict[str, str], subfolder: str) -> dict[str, str] | None:
    """The tokenizer files our exporter stored in the header (ldm_export.TOKENIZERS_KEY), or None."""
    try:
        files = json.loads(meta.get(TOKENIZERS_KEY, "{}")).get(subfolder)
    except (json.JSONDecodeError, AttributeError):
        return None
    ok = isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    return files if ok and files else None
