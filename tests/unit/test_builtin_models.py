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
