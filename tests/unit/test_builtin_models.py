"""The built-in models: the quickstart's VAE reconstructs images (colour_vae), and building is deterministic."""
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.sd.builtin_models import BUILTINS, builtin_folder, colour_vae

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = ROOT / "examples" / "quickstart_data"


def quickstart_pixels() -> torch.Tensor:
    """The quickstart images, each resized to 64 x 64, as the VAE takes them: [N, 3, 64, 64] in [-1, 1]."""
    from PIL import Image
    files = sorted(p for p in QUICKSTART_DATA.rglob("*") if p.suffix in (".png", ".jpg") and "-masklabel" not in p.name)
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)) for f in files]
    return torch.tensor(np.stack(arrays), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1


def block_means(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each f x f block replaced by its mean colour: the best a 1/f-size colour latent can do."""
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, f), scale_factor=f)


def test_colour_vae_decodes_block_colours_and_reconstructs_the_quickstart_images():
    vae = colour_vae(BUILTINS["tiny-sd-quickstart"][2])
    x = quickstart_pixels()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        latents = posterior.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
        y = vae.decode(latents / vae.config.scaling_factor).sample
    assert posterior.std.max() < 1e-6                                    # a sample is the mean
    torch.testing.assert_close(latents[:, :3] / vae.config.scaling_factor, torch.nn.functional.avg_pool2d(x, 8),
                               atol=1e-4, rtol=0)                         # latent = colours at 1/8 size
    assert latents[:, 3].abs().max() < 1e-5                             # channel 3: unused
    torch.testing.assert_close(y, block_means(x, 8), atol=1e-3, rtol=0)  # decoded = those colours, upsampled
    mse = torch.nn.functional.mse_loss(y, x).item()
    assert mse < 0.04, mse   # 0.033 measured (pixels in [-1, 1]): the blocks' edges, nothing else
    assert 0.8 < latents[:, :3].std().item() < 1.2   # scaling_factor gives the UNet latents of about unit std


def test_colour_vae_decodes_any_latent_to_its_colours():
    """What sampling gives it: latents the UNet made, beyond the data's range too."""
    vae = colour_vae(BUILTINS["tiny-sd-quickstart"][2])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5
    with torch.no_grad():
        y = vae.decode(z).sample
    torch.testing.assert_close(y, torch.nn.functional.interpolate(z[:, :3], scale_factor=8), atol=2e-3, rtol=0)


def test_colour_vae_refuses_another_layout():
    with pytest.raises(ValueError, match="12 channels"):
        colour_vae(BUILTINS["tiny-sd"][2])


def test_builtin_quickstart_model_is_the_same_on_every_build(tmp_path):
    """Fixed seeds and written-down VAE weights: two builds are the same bytes, so runs and samples repeat."""
    a, b = builtin_folder("tiny-sd-quickstart", tmp_path / "a"), builtin_folder("tiny-sd-quickstart", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)
    sched = (a / "scheduler" / "scheduler_config.json").read_text()
    assert '"v_prediction"' in sched


def test_tiny_sdxl_loads_as_an_sdxl_pipeline_and_samples(tiny_sdxl_folder):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    te1, te2, unet = pipe.text_encoder, pipe.text_encoder_2, pipe.unet
    assert type(te2).__name__ == "CLIPTextModelWithProjection"
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    add_time = unet.config.addition_time_embed_dim
    assert unet.config.projection_class_embeddings_input_dim == te2.config.projection_dim + 6 * add_time
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2.pad_token_id == te2.config.pad_token_id
    assert pipe.vae.config.scaling_factor == 0.13025
    proj = te2.text_projection.weight
    assert proj.shape == (te2.config.projection_dim, te2.config.hidden_size)  # 12 x 24: a transposition shows
    square = proj[:, :proj.shape[0]]
    assert not torch.allclose(square, square.T)
    images = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_tiny_sdxl_is_the_same_on_every_build(tmp_path):
    a, b = builtin_folder("tiny-sdxl", tmp_path / "a"), builtin_folder("tiny-sdxl", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {"text_encoder_2", "tokenizer_2"} <= {p.parts[0] for p in files}
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)


def test_builtin_sdxl_is_the_sdxl_1_0_base_architecture():
    """Built on the meta device (no memory, no time): the published parameter counts of SDXL 1.0 base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from utils.sd.builtin_models import SECOND_TEXT_ENCODER
    unet_kw, clip_kw, vae_kw, _, _ = BUILTINS["sdxl"]
    with torch.device("meta"):
        parts = [UNet2DConditionModel(**unet_kw), CLIPTextModel(CLIPTextConfig(**clip_kw)),
                 CLIPTextModelWithProjection(CLIPTextConfig(**SECOND_TEXT_ENCODER["sdxl"])), AutoencoderKL(**vae_kw)]
    counts = [sum(p.numel() for p in m.parameters()) for m in parts]
    assert counts == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
