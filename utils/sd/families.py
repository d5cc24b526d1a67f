"""Model families as data: what differs between SD1.x, SD2.x and SDXL is a record here, not a branch.

Conversion (utils/sd/ldm_export.py, utils/sd/ldm_import.py), loading (utils/sd/models.py) and the architecture
checks (utils/sd/model_arch.py) read these records; a new family is a new entry in FAMILIES plus whatever its
records cannot describe yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

from utils.core.config_schema import ConfigError, read_json

# The shipped LDM yamls (import configs and export sidecars) and CLIP's BPE merge list; utils/sd/ldm_configs/README.md.
CONFIG_DIR = Path(__file__).resolve().with_name("ldm_configs")

# Single-file (LDM layout) key prefixes. Every SD1/SD2 file keeps its UNet and VAE under the same two names.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."   # SD1: HF CLIPTextModel state dict (transformers 4.x keys)
OPEN_CLIP_PREFIX = "cond_stage_model.model."    # SD2: OpenCLIP text tower
# SDXL files are in Stability's SGM layout: UNet and VAE as above, the text encoders as "embedders" of a conditioner.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, HF CLIPTextModel keys (transformers 4.x)
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."    # OpenCLIP-bigG text tower, with its text_projection

Layout = Literal["hf_clip", "open_clip"]
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _frozen(d: dict) -> Mapping:
    # Records are shared module constants: a caller that edits a config gets a copy (dict(...)), never ours.
    return MappingProxyType(d)


@dataclass(frozen=True)
class TextEncoder:
    subfolder: str             # in a diffusers folder
    single_file_prefix: str    # in an LDM single file
    layout: Layout             # how its keys are laid out in a single file
    import_config: Mapping     # transformers CLIPTextConfig of the release, used when a single file is imported
    pad_token: str             # the release tokenizer's padding token
    transformers_class: str = "CLIPTextModel"  # CLIPTextModelWithProjection: keeps (and converts) text_projection
    tokenizer_subfolder: str = "tokenizer"
    # Resblocks a single file holds beyond the diffusers model's layers. SD2 files hold OpenCLIP-H's 24 where
    # diffusers keeps the 23 it conditions on; SDXL keeps all 32 of bigG (it reads the penultimate hidden state).
    file_extra_layers: int = 0


@dataclass(frozen=True)
class PredictionFiles:
    import_yaml: str           # the LDM config (in CONFIG_DIR) a single file of this kind is imported with
    sidecar: str | None        # `<stem>.yaml` written next to an export; None: what web UIs assume without one
    modelspec_architecture: str


@dataclass(frozen=True)
class ModelFamily:
    name: str                  # the key in FAMILIES
    title: str                 # what messages call it
    pipeline_class: str        # diffusers pipeline class in model_index.json
    diffusers_single_file_type: str  # diffusers' infer_diffusers_model_type answer for such a file
    text_encoders: tuple[TextEncoder, ...]
    unet_prefix: str
    vae_prefix: str
    vae_scaling_factor: float
    conditioning: str          # how the UNet's text conditioning is built from the encoders' outputs
    prediction: Mapping        # prediction type -> PredictionFiles
    upcast_attention: bool     # set on the UNet config of an imported file (fp16 attention overflows without it)
    # Where the release had epsilon and v-prediction models whose weights look alike, an import with nothing saying
    # which one a file is logs this after assuming epsilon (what web UIs do without a sidecar); None elsewhere.
    no_sidecar_warning: str | None
    # The UNet's added conditioning (its config's addition_embed_type): None for SD1/SD2; SDXL's "text_time" takes
    # the second encoder's pooled output and the (original size, crop, target size) numbers.
    addition_embed_type: str | None = None
    # model_index.json keys a diffusers folder of this family carries beyond its parts (SDXL: an empty prompt's
    # conditioning is zeros, not the encoders' output for "").
    pipeline_extras: Mapping = field(default_factory=lambda: MappingProxyType({}))


# Text-encoder configs of the real releases: kohya and diffusers use the same literals. SD2 keeps 23 of OpenCLIP-H's
# 24 layers because SD2 conditions on the penultimate layer's output. diffusers' SD1.5 / SD2.x tokenizers differ only
# in padding: SD2 pads with "!" (id 0), as OpenCLIP does.
_CLIP_L = TextEncoder("text_encoder", CLIP_PREFIX, "hf_clip", _frozen(dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407)), pad_token="<|endoftext|>")
_OPEN_CLIP_H = TextEncoder("text_encoder", OPEN_CLIP_PREFIX, "open_clip", _frozen(dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0)), pad_token="!", file_extra_layers=1)
# SDXL 1.0 base: CLIP-L as in SD1 (under another prefix), and OpenCLIP ViT-bigG/14 with its projection.
_SDXL_CLIP_L = TextEncoder("text_encoder", SDXL_CLIP_PREFIX, "hf_clip", _CLIP_L.import_config, pad_token="<|endoftext|>")
_OPEN_CLIP_BIG_G = TextEncoder("text_encoder_2", SDXL_OPEN_CLIP_PREFIX, "open_clip", _frozen(dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0)), pad_token="!", transformers_class="CLIPTextModelWithProjection",
    tokenizer_subfolder="tokenizer_2")

FAMILIES: dict[str, ModelFamily] = {
    "sd1": ModelFamily(
        name="sd1", title="SD1.x", pipeline_class="StableDiffusionPipeline", diffusers_single_file_type="v1",
        text_encoders=(_CLIP_L,), unet_prefix=UNET_PREFIX, vae_prefix=VAE_PREFIX, vae_scaling_factor=0.18215,
        conditioning="hidden_states_clip_skip",
        # SD1 epsilon is what every web UI assumes without a sidecar.
        prediction=_frozen({
            "epsilon": PredictionFiles("v1-inference.yaml", None, "stable-diffusion-v1"),
            "v_prediction": PredictionFiles("v1-inference-v.yaml", "v1-inference-v.yaml", "stable-diffusion-v1")}),
        upcast_attention=False, no_sidecar_warning=None),
    "sd2": ModelFamily(
        name="sd2", title="SD2.x", pipeline_class="StableDiffusionPipeline", diffusers_single_file_type="v2",
        text_encoders=(_OPEN_CLIP_H,), unet_prefix=UNET_PREFIX, vae_prefix=VAE_PREFIX, vae_scaling_factor=0.18215,
        conditioning="hidden_states_clip_skip",
        prediction=_frozen({
            "epsilon": PredictionFiles("v2-inference.yaml", "v2-inference.yaml", "stable-diffusion-v2-512"),
            "v_prediction": PredictionFiles("v2-inference-v.yaml", "v2-inference-v.yaml",
                                            "stable-diffusion-v2-768-v")}),
        # diffusers sets it for SD2.1, which overflows fp16 attention without it
        upcast_attention=True,
        no_sidecar_warning="SD2 file with no .yaml sidecar: assuming epsilon (SD2 512-base). For an SD2 768-v model "
                           "pass prediction_type='v_prediction' (CLI: --prediction_type v_prediction)"),
    "sdxl": ModelFamily(
        name="sdxl", title="SDXL", pipeline_class="StableDiffusionXLPipeline", diffusers_single_file_type="xl_base",
        text_encoders=(_SDXL_CLIP_L, _OPEN_CLIP_BIG_G), unet_prefix=UNET_PREFIX, vae_prefix=VAE_PREFIX,
        vae_scaling_factor=0.13025, conditioning="sdxl_penultimate_concat_pooled",
        # Stability's sd_xl_base.yaml, which web UIs pick for SDXL keys without a sidecar; A1111's sd_xl_v.yaml for
        # v-prediction (the v_pred marker is what ComfyUI reads). Modelspec has one SDXL base architecture name.
        prediction=_frozen({
            "epsilon": PredictionFiles("sd_xl_base.yaml", None, "stable-diffusion-xl-v1-base"),
            "v_prediction": PredictionFiles("sd_xl_v.yaml", "sd_xl_v.yaml", "stable-diffusion-xl-v1-base")}),
        upcast_attention=False, no_sidecar_warning=None, addition_embed_type="text_time",
        pipeline_extras=_frozen({"force_zeros_for_empty_prompt": True})),
}


def supported_titles() -> str:
    """'SD1.x and SD2.x': what messages say is supported."""
    titles = [f.title for f in FAMILIES.values()]
    return ", ".join(titles[:-1]) + " and " + titles[-1] if len(titles) > 1 else titles[0]


def text_config_layout(config: Mapping) -> Layout:
    """OpenCLIP (SD2) text towers use GELU; OpenAI's CLIP-L (SD1) uses QuickGELU (transformers' default)."""
    return "open_clip" if config.get("hidden_act", "quick_gelu") == "gelu" else "hf_clip"


def family_from_text_configs(configs: Sequence[Mapping], source: str | Path = "model") -> ModelFamily:
    """The family whose text encoders have these configs' layouts, in subfolder order (text_encoder, text_encoder_2)."""
    layouts = tuple(text_config_layout(c) for c in configs)
    for family in FAMILIES.values():
        if tuple(e.layout for e in family.text_encoders) == layouts:
            return family
    raise ConfigError(f"{source}: no supported model family has text encoders laid out as "
                      f"{', '.join(layouts) or 'nothing'}; supported: {supported_titles()}")


def family_of_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers folder, from its text encoders' configs (text_encoder/, text_encoder_2/, ...)."""
    folder = Path(folder)
    subfolders = ["text_encoder"] + sorted(p.name for p in folder.glob("text_encoder_*") if p.is_dir())
    configs = [read_json(folder / s / "config.json", "text encoder config") for s in subfolders]
    return family_from_text_configs(configs, folder)


def _lacking(sd: Mapping, source: str | Path, unet_in, has_vae: bool, has_text: bool) -> ConfigError:
    prefixes = sorted({k.split(".")[0] for k in sd})[:8]
    lacking = [n for n, ok in ((f"{UNET_PREFIX}* (UNet)", unet_in is not None), (f"{VAE_PREFIX}* (VAE)", has_vae),
                               ("the text encoders", has_text)) if not ok]
    encoders = " or ".join(f"'{e.single_file_prefix}*' ({f.name.upper()})"
                           for f in FAMILIES.values() for e in f.text_encoders)
    titles = "/".join(f.title for f in FAMILIES.values())
    return ConfigError(f"{source}: not an {titles} single-file checkpoint: lacks {', '.join(lacking)}. "
                       f"Expected '{UNET_PREFIX}*', '{VAE_PREFIX}*' and {encoders}; found top-level names "
                       f"{', '.join(prefixes)}")


def families_with_encoders_of(keys) -> list[ModelFamily]:
    """The families all of whose text encoders' single-file prefixes occur among these key names."""
    keys = list(keys)
    return [f for f in FAMILIES.values()
            if all(any(k.startswith(e.single_file_prefix) for k in keys) for e in f.text_encoders)]


def family_from_keys(sd: Mapping, source: str | Path) -> ModelFamily:
    """The family of an LDM single file's state dict, from its key layout; ConfigError naming the file and what
    was expected otherwise."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from utils.sd.model_arch import check_single_file_keys  # here: model_arch reads FAMILIES at import

    check_single_file_keys(sd, source)  # SDXL refiners and other SGM-layout files
    kind = infer_diffusers_model_type(sd)  # 'v1' is also its answer for anything it does not recognise
    if kind not in {f.diffusers_single_file_type for f in FAMILIES.values()}:
        raise ConfigError(f"{source}: this looks like a '{kind}' checkpoint; only {supported_titles()} text-to-image "
                          f"checkpoints are supported")
    unet_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    has_vae = any(k.startswith(VAE_PREFIX) for k in sd)
    # Later families win: a file with both CLIP layouts (some merges) has always been read as SD2.
    found = families_with_encoders_of(sd)
    if unet_in is None or not has_vae or not found:
        raise _lacking(sd, source, unet_in, has_vae, bool(found))
    if unet_in.ndim != 4 or unet_in.shape[1] != 4:
        raise ConfigError(f"{source}: the UNet takes {unet_in.shape[1]} input channels (inpainting/depth model?); "
                          f"only 4-channel text-to-image models are supported")
    return found[-1]
