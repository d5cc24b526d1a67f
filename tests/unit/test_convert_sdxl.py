"""SDXL single files: export of a diffusers SDXL folder to the SGM layout ComfyUI / A1111 load, import back, and the
key layout of the real SDXL 1.0 base architecture checked against diffusers' own SGM -> diffusers conversion."""
import json
import shutil

import pytest
import torch

from utils.sd import ldm_export as E
from utils.sd import ldm_import as I
from utils.sd import ldm_keys as K
from utils.sd.families import FAMILIES
from utils.sd.ldm_files import read_single_file, read_weights

SDXL = FAMILIES["sdxl"]
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(a_folder, b_folder):
    for part in PARTS:
        a, b = read_weights(a_folder / part), read_weights(b_folder / part)
        assert set(a) == set(b), (part, sorted(set(a) ^ set(b))[:4])
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_folder, tmp_path_factory):
    return E.save_single_file(tiny_sdxl_folder, tmp_path_factory.mktemp("x") / "tiny-sdxl.safetensors", half=False)


def test_export_writes_the_sgm_layout(sdxl_file, tiny_sdxl_folder):
    sd, meta = read_single_file(sdxl_file)
    tops = {k.split(".")[0] for k in sd if "." in k}
    assert tops == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in sd)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    g = "conditioner.embedders.1.model."
    assert f"{g}transformer.resblocks.1.attn.in_proj_weight" in sd and f"{g}transformer.resblocks.2.ln_1.weight" \
        not in sd                                        # all layers, none added (SD2 adds one)
    assert f"{g}logit_scale" in sd and f"{g}positional_embedding" in sd
    proj = read_weights(tiny_sdxl_folder / "text_encoder_2")["text_projection.weight"]   # [12, 24]
    assert torch.equal(sd[f"{g}text_projection"], proj.T)                               # OpenCLIP: x @ P
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"
    assert set(json.loads(meta[E.DIFFUSERS_CONFIGS_KEY])) == set(PARTS)
    assert not sdxl_file.with_suffix(".yaml").exists() and "v_pred" not in sd


@pytest.mark.parametrize("with_config_folder", [False, True])
def test_round_trip_gives_every_tensor_back(sdxl_file, tiny_sdxl_folder, tmp_path, with_config_folder):
    out = I.single_file_to_diffusers(sdxl_file, tmp_path / "back",
                                     config_folder=tiny_sdxl_folder if with_config_folder else None)
    _assert_same_weights(tiny_sdxl_folder, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((out / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    if with_config_folder:  # its tokenizers fit the tiny vocabulary: the pipeline samples
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        assert pipe("a", num_inference_steps=1, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)


def test_diffusers_from_single_file_loads_the_export_offline(sdxl_file, tiny_sdxl_folder):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(tiny_sdxl_folder),
                                                      local_files_only=True)
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    for part in PARTS:
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        got = {k: v for k, v in got.items() if "position_ids" not in k}
        want = {k: v for k, v in want.items() if "position_ids" not in k}
        assert set(got) == set(want), part
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{part}: {k}")


def test_v_prediction_export_carries_the_markers(tiny_sdxl_folder, tmp_path):
    folder = tmp_path / "v"
    shutil.copytree(tiny_sdxl_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    out = E.save_single_file(folder, tmp_path / "v.safetensors")
    sd, meta = read_single_file(out)
    assert "v_pred" in sd and "ztsnr" in sd
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert out.with_suffix(".yaml").read_bytes() == (I.CONFIG_DIR / "sd_xl_v.yaml").read_bytes()
    assert I.resolve_prediction_type(out, SDXL, {}, None) == "v_prediction"          # from the sidecar alone
    out.with_suffix(".yaml").unlink()
    back = I.single_file_to_diffusers(out, tmp_path / "back")                         # header and markers
    sched = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True


def test_the_real_sdxl_layout_matches_diffusers_own_sgm_conversion():
    """builtin:sdxl (SDXL 1.0 base architecture) built on the meta device, exported key by key, then read back by
    diffusers' single-file functions (written for the released SDXL files) and by diffusers' config reader on
    Stability's sd_xl_base.yaml: every tensor lands in the real architecture with its shape, nothing is left over."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as S
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from utils.sd.builtin_models import BUILTINS, SECOND_TEXT_ENCODER
    unet_kw, clip_kw, vae_kw, _, _ = BUILTINS["sdxl"]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_kw), AutoencoderKL(**vae_kw)
        te1 = CLIPTextModel(CLIPTextConfig(**clip_kw))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SECOND_TEXT_ENCODER["sdxl"]))
    l_enc, g_enc = SDXL.text_encoders
    sd = {**K.unet_to_ldm(unet.state_dict(), dict(unet.config)), **K.vae_to_ldm(vae.state_dict(), dict(vae.config)),
          **K.text_encoder_to_ldm(te1.state_dict(), dict(te1.config.to_dict()), l_enc),
          **K.text_encoder_to_ldm(te2.state_dict(), dict(te2.config.to_dict()), g_enc)}
    assert S.infer_diffusers_model_type(sd) == "xl_base"
    yaml_unet = S.create_unet_diffusers_config_from_ldm(I.load_original_config(SDXL, "epsilon"), sd)
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    for key in ("block_out_channels", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "down_block_types",
                "up_block_types", "layers_per_block", "use_linear_projection", "addition_embed_type"):
        assert plain(yaml_unet[key]) == plain(unet.config[key]), key

    def same_shapes(converted, model, what, ldm_count):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in converted.items() if "position_ids" not in k}
        want = {k.removeprefix("text_model."): v for k, v in want.items()}
        assert got == want, (what, sorted(set(got) ^ set(want))[:4])
        assert ldm_count == len(want), (what, ldm_count, len(want))   # nothing written that diffusers leaves over

    def count(prefix):
        return sum(1 for k in sd if k.startswith(prefix) and "position_ids" not in k)
    same_shapes(S.convert_ldm_unet_checkpoint(sd, dict(unet.config)), unet, "unet", count("model.diffusion_model."))
    same_shapes(S.convert_ldm_vae_checkpoint(sd, dict(vae.config)), vae, "vae", count("first_stage_model."))
    same_shapes(S.convert_ldm_clip_checkpoint(sd), te1, "clip-l", count(l_enc.single_file_prefix))
    g = g_enc.single_file_prefix
    fused = sum(1 for k in sd if k.startswith(g) and ".in_proj_" in k)            # q/k/v in one: 2 more each
    converted = S.convert_open_clip_checkpoint(te2, sd, prefix=g)
    same_shapes(converted, te2, "openclip-g", count(g) - 1 + 2 * fused)            # - logit_scale (unused)
    assert tuple(sd[g + "text_projection"].shape) == (1280, 1280)
    # the VAE's mid-block attention as 1x1 convolutions, as SGM stores it
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_pruning_keeps_both_text_encoders(sdxl_file, tmp_path):
    from utils.sd.ldm_files import prune_single_file
    got, _ = read_single_file(prune_single_file(sdxl_file, tmp_path / "pruned.safetensors", half=False))
    ref, _ = read_single_file(sdxl_file)
    assert set(got) == set(ref)


def test_a_tiny_vocabulary_tokenizer_travels_in_the_header(sdxl_file, tiny_sdxl_folder, tmp_path):
    """The built-in models' character-level tokenizers are not CLIP's: the export carries them, so the imported
    folder tokenizes as the original (a training run can start from the file), and a file without them is refused
    in one line instead of an index error at the first step."""
    from transformers import CLIPTokenizer
    from utils.core.config_schema import ConfigError
    out = I.single_file_to_diffusers(sdxl_file, tmp_path / "back")
    for sub in ("tokenizer", "tokenizer_2"):
        a, b = CLIPTokenizer.from_pretrained(tiny_sdxl_folder / sub), CLIPTokenizer.from_pretrained(out / sub)
        assert len(a) == len(b) and a("a red ball").input_ids == b("a red ball").input_ids
    from safetensors.torch import save_file
    sd, meta = read_single_file(sdxl_file)
    meta.pop(E.TOKENIZERS_KEY)
    plain = tmp_path / "plain.safetensors"
    save_file(sd, str(plain), metadata=meta)
    with pytest.raises(ConfigError, match=r"plain.safetensors: text_encoder has a 514-token vocabulary.*"
                                          r"--config_folder"):
        I.single_file_to_diffusers(plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_its_text_encoder_is_refused_in_one_line(tiny_sdxl_folder, tmp_path):
    from utils.core.config_schema import ConfigError
    from utils.sd.models import load_sd_model
    folder = shutil.copytree(tiny_sdxl_folder, tmp_path / "m")
    shutil.rmtree(folder / "tokenizer_2")
    I.write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")     # CLIP's 49408 tokens for a 514-token encoder
    with pytest.raises(ConfigError, match=r"tokenizer_2: the tokenizer has 49408 tokens, but text_encoder_2 embeds "
                                          r"only 514"):
        load_sd_model(folder)
