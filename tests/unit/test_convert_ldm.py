"""utils/sd/ldm_*.py and convert_ldm.py (CLI): diffusers <-> LDM single-file conversion, all offline.

The tiny models have SD1.5's real block topology (4 levels, 2 layers per block, cross-attention in the first three
down / last three up blocks) and its width ratios 1:2:4:4 (so the same blocks need skip convolutions) with tiny
widths, so their UNet and VAE tensor names are exactly those of a real SD1.5 file.

tests/assets/ldm_reference_keys.json.gz holds the names and shapes of the original SD1.5 / SD2.1 files, generated
by tests/assets/gen_ldm_reference_keys.py from the original model code (Stability-AI's `ldm` modules from the
stable-diffusion-sdkit wheel, OpenCLIP's ViT-H-14 text tower from the open_clip_torch wheel, transformers 4.30's
CLIPTextModel), all built on the meta device: no weights downloaded, and independent of this converter.

Tests marked slow build the full SD1.5 / SD2.1 architectures with random weights (about a minute each on 2 cores).
"""
from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch

from utils.sd import convert_ldm as C
from utils.sd import families as F
from utils.sd import ldm_export as E
from utils.sd import ldm_files as LF
from utils.sd import ldm_import as I
from utils.sd import ldm_keys as K
from utils.core.config_schema import ConfigError

SD1, SD2 = F.FAMILIES["sd1"], F.FAMILIES["sd2"]
ASSETS = Path(__file__).resolve().parents[1] / "assets"

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 16, 16),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
CLIP = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8, 16, 16), norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, sample_size=32)
SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
# SD2 flavour: linear transformer projections, an OpenCLIP-style (GELU) text encoder, v-prediction.
UNET2 = {**UNET, "use_linear_projection": True, "attention_head_dim": (1, 2, 4, 4)}
CLIP2 = {**CLIP, "hidden_act": "gelu"}


def _write_tiny(folder: Path, unet_kw: dict, clip_kw: dict, sched_kw: dict) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.sd.builtin_models import write_tokenizer
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_kw).save_pretrained(folder / "unet")
    torch.manual_seed(1)
    CLIPTextModel(CLIPTextConfig(**clip_kw)).save_pretrained(folder / "text_encoder")
    torch.manual_seed(2)
    AutoencoderKL(**VAE).save_pretrained(folder / "vae")
    DDPMScheduler(**sched_kw).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", clip_kw["max_position_embeddings"])
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    return {c: load_file(next((folder / c).glob("*.safetensors"))) for c in ("unet", "vae", "text_encoder")}


def _configs(folder: Path) -> dict[str, dict]:
    return {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], dtype=None) -> None:
    """0 missing, 0 extra, 0 mismatched; equality after reshaping to our shape (1x1 conv vs linear)."""
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not missing and not extra, f"missing {missing[:3]}, extra {extra[:3]}"
    bad = [k for k in ours if not torch.equal((ours[k] if dtype is None else ours[k].to(dtype)),
                                               theirs[k].reshape(ours[k].shape).to(dtype or theirs[k].dtype))]
    assert not bad, f"{len(bad)} mismatched tensors, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def reference() -> dict:
    with gzip.open(ASSETS / "ldm_reference_keys.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("sd1") / "model", UNET, CLIP, SCHED)


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("sd2") / "model", UNET2, CLIP2,
                       {**SCHED, "prediction_type": "v_prediction"})


@pytest.fixture(scope="module")
def sd1_fp32_file(sd1, tmp_path_factory) -> Path:
    return E.save_single_file(sd1, tmp_path_factory.mktemp("export") / "tiny.safetensors", half=False)


# ---------------------------------------------------------------------------------------------------------------
# State-dict level round trips
# ---------------------------------------------------------------------------------------------------------------

def test_unet_and_vae_round_trip_exactly(sd1):
    w, cfg = _weights(sd1), _configs(sd1)
    assert_same_tensors(w["unet"], K.ldm_to_unet(K.unet_to_ldm(w["unet"], cfg["unet"]), cfg["unet"]))
    ldm_vae = K.vae_to_ldm(w["vae"], cfg["vae"])
    # LDM keeps the VAE attention projections as 1x1 convolutions (EveryDream2 D27).
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ldm_vae["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert_same_tensors(w["vae"], K.ldm_to_vae(ldm_vae, cfg["vae"]))


def test_legacy_vae_attention_names_map_to_the_same_ldm_keys(sd1):
    w, cfg = _weights(sd1), _configs(sd1)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in w["vae"].items():
        for new, old in legacy_names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != w["vae"].keys()
    assert_same_tensors(K.vae_to_ldm(w["vae"], cfg["vae"]), K.vae_to_ldm(legacy, cfg["vae"]))


def test_tiny_keys_are_real_sd15_names(sd1, reference):
    w, cfg = _weights(sd1), _configs(sd1)
    ref = reference["sd15"]
    unet_vae = {**K.unet_to_ldm(w["unet"], cfg["unet"]), **K.vae_to_ldm(w["vae"], cfg["vae"])}
    ref_unet_vae = {k for k in ref if k.startswith((F.UNET_PREFIX, F.VAE_PREFIX))}
    assert set(unet_vae) == ref_unet_vae
    # Same topology, so every tensor has the real rank (1x1 convs included).
    assert all(len(unet_vae[k].shape) == len(ref[k]) for k in unet_vae)
    clip = K.text_encoder_to_ldm(w["text_encoder"], cfg["text_encoder"])
    assert set(clip) <= set(ref), sorted(set(clip) - set(ref))[:3]


def test_clip_keys_with_and_without_text_model_prefix(sd1):
    w, cfg = _weights(sd1), _configs(sd1)
    plain = w["text_encoder"]
    assert not any(k.startswith("text_model.") for k in plain)  # transformers 5.x layout
    prefixed = {"text_model." + k: v for k, v in plain.items()}  # transformers 4.x layout
    a = K.text_encoder_to_ldm(plain, cfg["text_encoder"])
    b = K.text_encoder_to_ldm(prefixed, cfg["text_encoder"])
    assert_same_tensors(a, b)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in a
    assert a["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(16))]
    assert_same_tensors(plain, K.ldm_to_text_encoder(a, cfg["text_encoder"]))


def test_open_clip_text_encoder_round_trip(sd2v):
    w, cfg = _weights(sd2v), _configs(sd2v)
    te, te_cfg = w["text_encoder"], cfg["text_encoder"]
    ldm = K.text_encoder_to_ldm(te, te_cfg)
    P = F.OPEN_CLIP_PREFIX
    assert not any(k.startswith(F.CLIP_PREFIX) for k in ldm)
    # One resblock more than the diffusers model: SD2 files hold 24 where diffusers keeps 23.
    blocks = {int(k.split(".")[4]) for k in ldm if ".resblocks." in k}
    assert blocks == {0, 1, 2}
    q, k, v = (te[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(ldm[P + "transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(ldm[P + "transformer.resblocks.2.mlp.c_fc.weight"], te["encoder.layers.1.mlp.fc1.weight"])
    assert ldm[P + "transformer.resblocks.2.attn.in_proj_weight"].data_ptr() != \
        ldm[P + "transformer.resblocks.1.attn.in_proj_weight"].data_ptr()  # a copy, not shared storage
    assert torch.equal(ldm[P + "text_projection"], torch.eye(16))
    assert ldm[P + "logit_scale"].item() == pytest.approx(math.log(100))
    assert torch.equal(ldm[P + "positional_embedding"], te["embeddings.position_embedding.weight"])
    assert_same_tensors(te, K.ldm_to_text_encoder(ldm, te_cfg))
    prefixed = {"text_model." + k: v for k, v in te.items()}
    assert_same_tensors(ldm, K.text_encoder_to_ldm(prefixed, te_cfg))


def test_schedule_buffers_match_the_original_ldm_code(reference):
    ours = K.schedule_buffers(SCHED)
    assert set(ours) == set(reference["schedule_sample_values"])
    idx = reference["schedule_sample_timesteps"]
    for name, values in reference["schedule_sample_values"].items():
        assert ours[name].dtype == torch.float32 and ours[name].shape == (1000,)
        assert ours[name][idx].tolist() == pytest.approx(values, rel=1e-6, abs=1e-12), name


def test_unmappable_unet_key_is_an_error(sd1):
    w, cfg = _weights(sd1), _configs(sd1)
    with pytest.raises(ConfigError, match="no LDM equivalent"):
        K.unet_to_ldm({**w["unet"], "class_embedding.linear_1.weight": torch.zeros(1)}, cfg["unet"])


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def test_export_default_is_fp16_safetensors_without_sidecar(sd1, tmp_path):
    from safetensors import safe_open
    out = E.save_single_file(sd1, tmp_path / "m.safetensors")
    assert out == tmp_path / "m.safetensors"
    assert not (tmp_path / "m.yaml").exists()  # SD1 epsilon: web UIs' default config
    with safe_open(str(out), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
        meta = f.metadata()
    assert {d for k, d in dtypes.items() if k.startswith(LF.MODEL_PREFIXES) and "position_ids" not in k} == \
        {torch.float16}
    assert {dtypes[k] for k in K.SCHEDULE_BUFFERS} == {torch.float32}
    assert dtypes["cond_stage_model.transformer.text_model.embeddings.position_ids"] == torch.int64
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.prediction_type"] == "epsilon"
    assert not set(dtypes) & {"v_pred", "ztsnr"}  # an epsilon model without zero terminal SNR has no markers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files left


def test_export_fp32(sd1_fp32_file):
    sd, _ = LF.read_single_file(sd1_fp32_file)
    assert {v.dtype for k, v in sd.items() if "position_ids" not in k} == {torch.float32}


def test_export_loads_with_diffusers_single_file_loader(sd1, sd1_fp32_file):
    """diffusers' own LDM loader, offline with config=<local folder>, reads our file into our exact tensors."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(sd1_fp32_file), config=str(sd1), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    w = _weights(sd1)
    assert_same_tensors(w["unet"], pipe.unet.state_dict())
    assert_same_tensors(w["vae"], pipe.vae.state_dict())
    te = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "embeddings.position_ids"}
    assert_same_tensors(w["text_encoder"], te)


def test_sd2_v_export_writes_v_sidecar_and_imports_back(sd2v, tmp_path):
    out = E.save_single_file(sd2v, tmp_path / "sd2.safetensors", half=False)
    sidecar = tmp_path / "sd2.yaml"
    assert sidecar.read_bytes() == (F.CONFIG_DIR / "v2-inference-v.yaml").read_bytes()
    sd, meta = LF.read_single_file(out)
    assert F.family_from_keys(sd, out).name == "sd2"
    assert meta["modelspec.prediction_type"] == "v"
    meta.pop("modelspec.prediction_type")
    assert I.resolve_prediction_type(out, SD2, meta, None) == "v_prediction"  # from the sidecar
    back = I.single_file_to_diffusers(out, tmp_path / "back", config_folder=sd2v)
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    w, w2 = _weights(sd2v), _weights(back)
    for c in ("unet", "vae", "text_encoder"):
        assert_same_tensors(w[c], w2[c])
    # diffusers' own loader reads the OpenCLIP layout (and skips the extra resblock) to the same tensors.
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(sd2v), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert_same_tensors(w["text_encoder"], {k: v for k, v in pipe.text_encoder.state_dict().items()
                                            if k != "embeddings.position_ids"})
    assert_same_tensors(w["unet"], pipe.unet.state_dict())


def test_sidecar_choice_and_stale_sidecar_removed(sd1, sd2v, tmp_path):
    assert E.sidecar_name(SD1, "epsilon") is None
    assert E.sidecar_name(SD1, "v_prediction") == "v1-inference-v.yaml"
    assert E.sidecar_name(SD2, "epsilon") == "v2-inference.yaml"
    out = tmp_path / "same.safetensors"
    E.save_single_file(sd2v, out)
    assert out.with_suffix(".yaml").is_file()
    E.save_single_file(sd1, out)  # same name, now an SD1 epsilon model: the SD2 sidecar must go
    assert not out.with_suffix(".yaml").exists()
    user_yaml = tmp_path / "keep.yaml"
    user_yaml.write_text("model: {params: {}}  # the user's own\n")
    E.save_single_file(sd1, tmp_path / "keep.safetensors")
    assert user_yaml.is_file()  # only our own shipped sidecars are ever removed


@pytest.fixture(scope="module")
def sd1v(sd1, tmp_path_factory) -> Path:
    """The SD1 tiny model as a v-prediction model."""
    import shutil
    folder = shutil.copytree(sd1, tmp_path_factory.mktemp("sd1v") / "model")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    return folder


def test_v_prediction_and_zero_terminal_snr_markers(sd1v, reference, tmp_path):
    """ComfyUI's convention: empty `v_pred` / `ztsnr` tensors; the header and the sidecar stay as they were."""
    out = E.save_single_file(sd1v, tmp_path / "v.safetensors", zero_terminal_snr=True)
    sd, meta = LF.read_single_file(out)
    # exactly these two keys beyond the release's (the tiny model's names are real SD1.5 names)
    assert set(sd) - set(reference["sd15"]) == {"v_pred", "ztsnr"}
    for key in ("v_pred", "ztsnr"):
        assert sd[key].shape == (0,) and sd[key].dtype == torch.float32
    assert meta["modelspec.prediction_type"] == "v"
    assert out.with_suffix(".yaml").read_bytes() == (F.CONFIG_DIR / "v1-inference-v.yaml").read_bytes()
    assert "ztsnr" not in LF.read_single_file(E.save_single_file(sd1v, tmp_path / "plain.safetensors"))[0]

    # diffusers' own single-file loader ignores the markers
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(sd1v), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert_same_tensors(_weights(sd1v)["unet"], pipe.unet.state_dict(), dtype=torch.float16)

    # import reads the markers alone (a file as ComfyUI saves it: no ModelSpec header, no sidecar)
    from safetensors.torch import save_file
    bare = tmp_path / "bare" / "comfy.safetensors"
    bare.parent.mkdir()
    save_file(sd, str(bare))
    back = I.single_file_to_diffusers(bare, tmp_path / "back", config_folder=sd1v)
    sched = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"
    forced = I.single_file_to_diffusers(bare, tmp_path / "forced", config_folder=sd1v, prediction_type="epsilon")
    assert json.loads((forced / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    # and a round trip keeps them: the imported folder's scheduler config says zero terminal SNR
    again, _ = LF.read_single_file(E.save_single_file(back, tmp_path / "again.safetensors"))
    assert {"v_pred", "ztsnr"} <= set(again)


def test_shipped_yamls_give_the_release_configs(reference):
    import yaml

    from utils.sd.builtin_models import BUILTINS
    for name in ("v1-inference.yaml", "v1-inference-v.yaml", "v2-inference.yaml", "v2-inference-v.yaml"):
        yaml.safe_load((F.CONFIG_DIR / name).read_text())
    fake = {k: torch.empty(v, device="meta") for k, v in reference["sd15"].items()}
    unet, vae = I.diffusers_configs_from_ldm(I.load_original_config(SD1, "epsilon"), fake, SD1)
    sd15_unet, _, sd15_vae, _, _ = BUILTINS["sd15"]
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "sample_size"):
        assert norm(unet[key]) == norm(sd15_unet[key]), key
    assert list(vae["block_out_channels"]) == list(sd15_vae["block_out_channels"]) and vae["sample_size"] == 512
    fake2 = {k: torch.empty(v, device="meta") for k, v in reference["sd21"].items()}
    unet2, vae2 = I.diffusers_configs_from_ldm(I.load_original_config(SD2, "v_prediction"), fake2, SD2)
    assert list(unet2["attention_head_dim"]) == [5, 10, 20, 20] and unet2["use_linear_projection"] is True
    assert unet2["cross_attention_dim"] == 1024 and unet2["sample_size"] == 96 and vae2["sample_size"] == 768
    unet2e, _ = I.diffusers_configs_from_ldm(I.load_original_config(SD2, "epsilon"), fake2, SD2)
    assert unet2e["sample_size"] == 64


def test_export_refuses_wrong_suffix_and_non_diffusers_folder(sd1, tmp_path):
    with pytest.raises(ConfigError, match=r"\*\.ckpt"):
        E.save_single_file(sd1, tmp_path / "m.safetensors", fmt="ckpt")
    with pytest.raises(ConfigError, match="missing unet/"):
        E.save_single_file(tmp_path, tmp_path / "m.safetensors")


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd-quickstart"])
def test_builtin_tiny_models_export_and_import_back(name, tiny_sd_folder, tmp_path):
    """The project's own built-in models (tiny-sd: 2 levels, 1 layer per block; the quickstart's: a 4-level VAE
    with written-down weights, v-prediction): what the trainer exports at each save."""
    from utils.sd.builtin_models import builtin_folder
    folder = tiny_sd_folder if name == "tiny-sd" else builtin_folder(name, tmp_path / "models")
    out = E.save_single_file(folder, tmp_path / f"{name}.safetensors", half=False)
    back = I.single_file_to_diffusers(out, tmp_path / "back", config_folder=folder)
    w, w2 = _weights(folder), _weights(back)
    for c in ("unet", "vae", "text_encoder"):
        assert_same_tensors(w[c], w2[c])


def test_export_from_partial_checkpoint_with_base_folder_and_ema_unet(sd1, tmp_path):
    import shutil
    ckpt = tmp_path / "step-000002"
    shutil.copytree(sd1 / "unet", ckpt / "ema_unet")  # a training checkpoint: trained parts only
    shutil.copytree(sd1 / "text_encoder", ckpt / "text_encoder")
    with pytest.raises(ConfigError, match="missing unet/, vae/, scheduler/"):
        E.save_single_file(ckpt, tmp_path / "x.safetensors")
    out = E.save_single_file(ckpt, tmp_path / "ema.safetensors", base_folder=sd1, unet_subfolder="ema_unet",
                             half=False)
    full = E.save_single_file(sd1, tmp_path / "full.safetensors", half=False)
    assert_same_tensors(LF.read_single_file(full)[0], LF.read_single_file(out)[0])


def test_export_is_atomic(sd1, tmp_path, monkeypatch):
    import safetensors.torch

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    out = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="disk full"):
        E.save_single_file(sd1, out)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------

def test_import_round_trip_loads_as_pipeline_offline(sd1, sd1_fp32_file, tmp_path):
    from diffusers import StableDiffusionPipeline
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = I.single_file_to_diffusers(sd1_fp32_file, tmp_path / "imported", config_folder=sd1)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    w = _weights(sd1)
    assert_same_tensors(w["unet"], pipe.unet.state_dict())
    assert_same_tensors(w["vae"], pipe.vae.state_dict())
    te = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "embeddings.position_ids"}
    assert_same_tensors(w["text_encoder"], te)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]


def test_import_fp16_file_keeps_half_weights(sd1, tmp_path):
    f = E.save_single_file(sd1, tmp_path / "half.safetensors")
    out = I.single_file_to_diffusers(f, tmp_path / "imported", config_folder=sd1)
    w, w2 = _weights(sd1), _weights(out)
    for c in ("unet", "vae", "text_encoder"):
        assert_same_tensors(w[c], w2[c], dtype=torch.float16)
        assert {v.dtype for v in w2[c].values()} == {torch.float16}


def test_import_refuses_existing_folder_unless_overwrite(sd1_fp32_file, sd1, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        I.single_file_to_diffusers(sd1_fp32_file, target, config_folder=sd1)
    I.single_file_to_diffusers(sd1_fp32_file, target, config_folder=sd1, overwrite=True)
    assert (target / "model_index.json").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_import_is_atomic(sd1_fp32_file, sd1, tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(DDPMScheduler, "save_pretrained", boom)
    with pytest.raises(OSError):
        I.single_file_to_diffusers(sd1_fp32_file, tmp_path / "out", config_folder=sd1)
    assert list(tmp_path.iterdir()) == []


def _without_header_configs(path, out):
    """A copy of an exported file as other tools write it: no diffusers configs in the header."""
    from safetensors.torch import save_file
    sd, meta = LF.read_single_file(path)
    meta.pop(E.DIFFUSERS_CONFIGS_KEY)
    save_file(sd, str(out), metadata=meta)
    return out


def test_import_with_the_wrong_architecture_names_the_problem(sd1_fp32_file, tmp_path):
    # Without config_folder or the header's configs the SD1.5 release configs apply; a tiny file cannot fill them.
    plain = _without_header_configs(sd1_fp32_file, tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match=r"UNet does not match.*missing|UNet does not match.*another shape"):
        I.single_file_to_diffusers(plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prediction_type_resolution(tmp_path, monkeypatch):
    warnings = []
    # Recorded directly: other tests' logging setup (handlers, propagation) must not matter here.
    monkeypatch.setattr(I.log, "warning", lambda msg, *args: warnings.append(msg % args))
    f = tmp_path / "m.safetensors"
    assert I.resolve_prediction_type(f, SD1, {}, None) == "epsilon"
    assert I.resolve_prediction_type(f, SD2, {"modelspec.prediction_type": "v"}, None) == "v_prediction"
    assert warnings == []
    assert I.resolve_prediction_type(f, SD2, {}, None) == "epsilon"
    assert len(warnings) == 1 and "v_prediction" in warnings[0]  # tells the user how to load a 768-v model
    f.with_suffix(".yaml").write_bytes((F.CONFIG_DIR / "v2-inference-v.yaml").read_bytes())
    assert I.resolve_prediction_type(f, SD2, {"modelspec.prediction_type": "epsilon"}, None) == "v_prediction"
    assert I.resolve_prediction_type(f, SD2, {}, "epsilon") == "epsilon"  # the argument wins
    with pytest.raises(ConfigError, match="prediction_type"):
        I.resolve_prediction_type(f, SD2, {}, "sample")
    f.with_suffix(".yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="sidecar"):
        I.resolve_prediction_type(f, SD2, {}, None)


# ---------------------------------------------------------------------------------------------------------------
# Reading files: .ckpt forms, refusals, layouts
# ---------------------------------------------------------------------------------------------------------------

def test_ckpt_round_trip_wrapped_and_flat(sd1, sd1_fp32_file, tmp_path):
    ref, _ = LF.read_single_file(sd1_fp32_file)
    wrapped = E.save_single_file(sd1, tmp_path / "m.ckpt", half=False, fmt="ckpt")
    got, _ = LF.read_single_file(wrapped)
    assert_same_tensors(ref, got)
    flat = tmp_path / "flat.ckpt"
    torch.save(ref, flat)
    assert_same_tensors(ref, LF.read_single_file(flat)[0])
    # A training checkpoint: state_dict plus bookkeeping that weights_only can read and we ignore.
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": ref, "global_step": 875000, "epoch": 3,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}]}, full)
    got, meta = LF.read_single_file(full)
    assert_same_tensors(ref, got)
    assert meta == {"global_step": "875000"}


EXECUTED = []


def _record_execution():
    EXECUTED.append(True)
    return "pwned"


class _Payload:
    def __reduce__(self):
        return (_record_execution, ())


def test_ckpt_needing_code_execution_is_refused_without_running_it(sd1_fp32_file, tmp_path):
    ref, _ = LF.read_single_file(sd1_fp32_file)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ref, "callbacks": _Payload()}, evil)
    with pytest.raises(ConfigError, match="pickle code execution") as e:
        LF.read_single_file(evil)
    assert "_record_execution" in str(e.value) and str(evil) in str(e.value)
    assert EXECUTED == []


def test_unknown_layout_sdxl_and_missing_file(tmp_path, sd1):
    from safetensors.torch import save_file
    diffusers_style = tmp_path / "unet_only.safetensors"
    save_file(_weights(sd1)["unet"], str(diffusers_style))
    sd, _ = LF.read_single_file(diffusers_style)
    with pytest.raises(ConfigError, match="not an SD1.x/SD2.x/SDXL single-file checkpoint") as e:
        F.family_from_keys(sd, diffusers_style)
    assert str(diffusers_style) in str(e.value) and "cond_stage_model" in str(e.value)
    # a safetensors file in the SGM layout of no family (an SDXL refiner) is refused by its key names, before its
    # tensors are read
    refiner_file = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3)}, str(refiner_file))
    with pytest.raises(ConfigError, match=r"refiner.safetensors is an SDXL refiner .*supports SD1.x, SD2.x and SDXL"):
        LF.read_single_file(refiner_file)
    refiner = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2)}
    with pytest.raises(ConfigError, match="SDXL refiner or another model in the SGM layout"):
        F.family_from_keys(refiner, "refiner.safetensors")
    inpaint = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
               "first_stage_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)}
    with pytest.raises(ConfigError, match="inpainting"):
        F.family_from_keys(inpaint, "inpaint.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        LF.read_single_file(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="cannot read"):
        LF.read_single_file(garbage)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE loop written out: merge the lowest-ranked adjacent pair everywhere, until none applies."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def test_real_clip_tokenizer_from_shipped_merges(tmp_path):
    from transformers import CLIPTokenizer
    folder = I.write_clip_tokenizer(tmp_path / "tok")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and len(merges) == 1 + 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    tok = CLIPTokenizer.from_pretrained(folder)
    assert len(tok) == 49408 and tok.model_max_length == 77
    # Well-known CLIP ids ("a</w>" 320, "photo</w>" 1125, "of</w>" 539, "cat</w>" 2368).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407
    ranks = {tuple(m.split()): i for i, m in enumerate(merges[1:])}
    for word in ("photorealistic", "astronaut", "everydream", "zzyzx"):
        ids = tok(word, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == _reference_bpe(word, ranks), word
    sd2 = CLIPTokenizer.from_pretrained(I.write_clip_tokenizer(tmp_path / "tok2", pad_token="!"))
    assert sd2.pad_token_id == 0  # diffusers' SD2 tokenizer pads with "!"
    assert sd2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Pruning and the command line
# ---------------------------------------------------------------------------------------------------------------

def test_prune_drops_ema_and_extras_and_halves(sd1_fp32_file, tmp_path):
    ref, _ = LF.read_single_file(sd1_fp32_file)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in ref.items() if k.startswith(F.UNET_PREFIX)}
    big = tmp_path / "big.ckpt"
    torch.save({"state_dict": {**ref, **ema, "model_ema.decay": torch.tensor(0.999), "lvlb_weights": torch.ones(3)},
                "optimizer_states": [{"state": {}}], "global_step": 10}, big)
    out = LF.prune_single_file(big, tmp_path / "small.safetensors")
    got, _ = LF.read_single_file(out)
    assert set(got) == set(ref)
    assert {v.dtype for k, v in got.items() if k.startswith(LF.MODEL_PREFIXES) and "position_ids" not in k} == \
        {torch.float16}
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[k], ref[k].half())
    with_ema, _ = LF.read_single_file(LF.prune_single_file(big, tmp_path / "ema.safetensors", use_ema=True, half=False))
    marked = tmp_path / "marked.ckpt"
    torch.save({"state_dict": {**ref, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}}, marked)
    kept, _ = LF.read_single_file(LF.prune_single_file(marked, tmp_path / "marked.safetensors"))
    assert set(kept) - set(ref) == {"v_pred", "ztsnr"} and kept["v_pred"].dtype == torch.float32
    assert torch.equal(with_ema[k], ref[k] + 1)
    with pytest.raises(ConfigError, match="no EMA weights"):
        LF.prune_single_file(sd1_fp32_file, tmp_path / "x.safetensors", use_ema=True)


def test_cli_round_trip_and_errors(sd1, tmp_path, capsys):
    single = tmp_path / "cli.safetensors"
    assert C.main(["to-single", str(sd1), str(single), "--fp32"]) == 0
    assert LF.read_single_file(single)[0]["model.diffusion_model.out.2.weight"].dtype == torch.float32
    assert C.main(["to-single", str(sd1), str(tmp_path / "cli.ckpt")]) == 0
    assert C.main(["prune", str(tmp_path / "cli.ckpt"), str(tmp_path / "pruned.safetensors")]) == 0
    capsys.readouterr()
    # Our export names its architecture in the header: a tiny file imports as it is.
    assert C.main(["to-diffusers", str(single), str(tmp_path / "back")]) == 0
    capsys.readouterr()
    # Without that, a tiny file does not fit the release configs: a one-line error, exit 2, nothing written.
    plain = _without_header_configs(single, tmp_path / "plain.safetensors")
    assert C.main(["to-diffusers", str(plain), str(tmp_path / "out"), "--prediction_type", "v_prediction"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert C.main(["to-single", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert C.main(["to-diffusers", str(tmp_path / "nope.ckpt"), str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit) as e:
        C.main(["to-diffusers", str(single), str(tmp_path / "o"), "--prediction_type", "sample"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Full-size architectures (random weights): key sets against the original releases, and the real import path
# ---------------------------------------------------------------------------------------------------------------

def _full_size_folder(name: str, folder: Path) -> Path:
    """A builtin full-size model with random fp16 weights, built without the slow per-layer initialisers."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.sd.builtin_models import BUILTINS
    unet_kw, clip_kw, vae_kw, sched_kw, _ = BUILTINS[name]
    # Windows into one random pool at varying offsets: every tensor differs from every other (a swapped or
    # misplaced tensor fails the comparisons) at the cost of a copy, not of drawing a billion random numbers.
    pool = torch.randn(50_700_000, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    n = 0
    for sub, build in (("unet", lambda: UNet2DConditionModel(**unet_kw)),
                       ("vae", lambda: AutoencoderKL(**vae_kw)),
                       ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**clip_kw)))):
        with torch.device("meta"):
            model = build().to(torch.float16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                n += 1
                start = (n * 7919) % 100_003
                p.copy_(pool[start:start + p.numel()].view(p.shape))
        model.save_pretrained(folder / sub)
        del model
    DDPMScheduler(**sched_kw).save_pretrained(folder / "scheduler")
    return folder


def _check_release_layout(out: Path, ref: dict[str, list[int]], markers=frozenset()) -> dict[str, torch.Tensor]:
    """The release's keys and shapes exactly, plus exactly the given marker tensors (empty, see ldm_markers)."""
    sd, _ = LF.read_single_file(out)
    assert set(sd) - set(ref) == set(markers), sorted(set(sd) - set(ref))[:3]
    assert set(ref) <= set(sd), sorted(set(ref) - set(sd))[:3]
    assert all(sd[k].numel() == 0 for k in markers)
    wrong = [k for k in sd if k not in markers and list(sd[k].shape) != ref[k]]
    assert not wrong, [(k, list(sd[k].shape), ref[k]) for k in wrong[:3]]
    return sd


def _check_import(folder: Path, imported: Path) -> None:
    """Every tensor back in place, in the configs the release yaml gives. (Loading the pipeline itself is the
    same code path as the tiny test's and would only add a 2 GB read.)"""
    from transformers import CLIPTokenizer
    w, w2 = _weights(folder), _weights(imported)
    for c in ("unet", "vae", "text_encoder"):
        assert_same_tensors(w[c], w2[c])
    cfg, cfg2 = _configs(folder), _configs(imported)
    for key in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection"):
        assert cfg2["unet"][key] == (list(cfg["unet"][key]) if isinstance(cfg["unet"][key], (list, tuple))
                                     else cfg["unet"][key]), key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
        assert cfg2["text_encoder"][key] == cfg["text_encoder"][key], key
    tok = CLIPTokenizer.from_pretrained(imported / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(json.loads((imported / "model_index.json").read_text())) >= {"unet", "vae", "text_encoder",
                                                                           "tokenizer", "scheduler"}


@pytest.fixture
def big_tmp(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps the last runs' temp folders, ~5 GB each for these tests."""
    import shutil
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_full_sd15_export_has_release_keys_and_imports(big_tmp, reference):
    tmp_path = big_tmp
    folder = _full_size_folder("sd15", tmp_path / "sd15")
    out = E.save_single_file(folder, tmp_path / "sd15.safetensors")
    assert not (tmp_path / "sd15.yaml").exists()
    sd = _check_release_layout(out, reference["sd15"])
    assert F.family_from_keys(sd, out).name == "sd1"
    del sd
    imported = I.single_file_to_diffusers(out, tmp_path / "imported")  # shipped yaml + release CLIP config
    assert json.loads((imported / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == \
        "<|endoftext|>"
    _check_import(folder, imported)


@pytest.mark.slow
def test_full_sd21_export_has_release_keys_and_imports(big_tmp, reference):
    from diffusers import UNet2DConditionModel
    tmp_path = big_tmp
    folder = _full_size_folder("sd21", tmp_path / "sd21")
    out = E.save_single_file(folder, tmp_path / "sd21.safetensors")
    sidecar = tmp_path / "sd21.yaml"
    assert sidecar.read_bytes() == (F.CONFIG_DIR / "v2-inference-v.yaml").read_bytes()
    sd = _check_release_layout(out, reference["sd21"], markers={"v_pred"})
    assert F.family_from_keys(sd, out).name == "sd2"
    del sd
    # diffusers' own loader, offline from the sidecar yaml alone, reads the same UNet tensors.
    unet = UNet2DConditionModel.from_single_file(str(out), original_config=str(sidecar), local_files_only=True)
    assert_same_tensors(_weights(folder)["unet"], unet.state_dict())
    del unet
    imported = I.single_file_to_diffusers(out, tmp_path / "imported")
    sched = json.loads((imported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # from the sidecar
    assert json.loads((imported / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    _check_import(folder, imported)
