"""Text conditioning is trained end to end: after training on solid colours captioned by their colour, the tiny
model predicts the noise of a colour's image better when told the right colour than a wrong one.

The built-in tiny VAE has random weights, and its GroupNorms map every solid colour to almost the same latent
(differences of ~0.02 under a posterior std of ~0.18), which would leave the caption nothing to add. This test
therefore makes the VAE's posterior deterministic and scales its latents up, so the colours are distinct latents;
and it uses v-prediction, whose target at high noise is mostly the clean latent, so the caption matters there.
"""
import torch

from tests.integration.conftest import base_args, run_train
from utils.run.checkpoint import find_last

COLOURS = {"red": (230, 20, 20), "green": (20, 210, 40), "blue": (30, 40, 230), "yellow": (235, 225, 30)}


def make_colour_dataset(root):
    from PIL import Image
    root.mkdir(parents=True)
    for name, rgb in COLOURS.items():
        for k in range(4):
            Image.new("RGB", (64, 64), rgb).save(root / f"{name}_{k}.png")  # caption: the file name before "_"
    return root


def colour_model(folder):
    from diffusers import AutoencoderKL
    from utils.sd.builtin_models import write_builtin
    write_builtin("tiny-sd-v", folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -30.0  # log-variance: a deterministic posterior
    vae.register_to_config(scaling_factor=20.0)
    vae.save_pretrained(folder / "vae")
    return folder


def noise_prediction_error(folder, caption_for, seed=0):
    """Mean squared error of the predicted noise over every colour, at fixed noise and timesteps in [500, 1000)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    sched, alphas = pipe.scheduler, pipe.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    errors = []
    with torch.no_grad():
        for name, rgb in COLOURS.items():
            pixels = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(16, 3, 64, 64)
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(500, 1000, (16,), generator=gen)
            ids = pipe.tokenizer([caption_for(name)] * 16, padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            noisy = sched.add_noise(latents, noise, t)
            v = pipe.unet(noisy, t, pipe.text_encoder(ids)[0]).sample
            a = alphas[t].view(-1, 1, 1, 1)
            predicted_noise = a.sqrt() * v + (1 - a).sqrt() * noisy  # eps from v (Salimans & Ho, 2022)
            errors.append(torch.nn.functional.mse_loss(predicted_noise, noise).item())
    return sum(errors) / len(errors)


def test_right_caption_predicts_noise_better_than_a_wrong_one(tmp_path):
    model = colour_model(tmp_path / "model")
    data = make_colour_dataset(tmp_path / "colours")
    logdir = tmp_path / "logs"
    assert run_train(base_args(model, data, logdir, batch_size=8, max_epochs=50, lr=3e-3, flip_p=0.0,
                               crop_jitter=0.0, timestep_start=500, log_step=50)) == 0
    names = list(COLOURS)
    wrong_caption = lambda n: names[(names.index(n) + 2) % len(names)]  # noqa: E731
    before = noise_prediction_error(model, lambda n: n), noise_prediction_error(model, wrong_caption)
    trained = find_last(logdir)
    after = noise_prediction_error(trained, lambda n: n), noise_prediction_error(trained, wrong_caption)
    assert abs(before[0] - before[1]) < 0.02 * before[1], before  # untrained: the caption changes nothing
    assert after[0] < 0.7 * after[1], after                         # trained: the right colour helps
    assert after[0] < 0.5 * before[0], (before, after)              # and the model learned at all
