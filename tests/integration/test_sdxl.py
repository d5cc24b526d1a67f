"""SDXL end to end on the built-in tiny SDXL model (CPU): both text encoders, the added size/crop conditioning,
samples with the SDXL pipeline, saves that diffusers and the single-file loaders read, exact resume."""
import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import base_args, checkpoint_weights, make_dataset, only_run, read_metrics, run_train


def final_ckpt(logdir: Path) -> Path:
    ckpts = [p for p in (only_run(logdir) / "ckpts").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return max((p for p in ckpts if not p.name.endswith("_ema")), key=lambda p: int(p.name.rsplit("gs", 1)[1]))


def quick_prompts(folder: Path) -> str:
    path = folder / "prompts.json"
    path.write_text(json.dumps({"size": [64, 64], "cfgs": [4], "samples": ["a red picture", "a blue square"]}))
    return str(path)


def test_sdxl_trains_both_text_encoders_samples_and_saves(tiny_sdxl_folder, tmp_path, monkeypatch):
    import utils.run.train_step as step_module
    seen = []
    real_loss = step_module.compute_loss

    def recording_loss(*args, **kwargs):
        seen.append((args[3].shape, kwargs.get("added_cond")))
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(step_module, "compute_loss", recording_loss)
    logdir = tmp_path / "logs"
    # several aspect buckets at resolution 128
    dataset = make_dataset(tmp_path / "data", sizes=((128, 128), (192, 128), (128, 192), (256, 128)))
    argv = base_args(tiny_sdxl_folder, dataset, logdir, max_epochs=2, sample_steps=3, save_every_n_epochs=1,
                     sample_prompts=quick_prompts(tmp_path), resolution=128)
    assert run_train(argv) == 0
    run = only_run(logdir)
    # several aspect buckets: the time ids' target size is each batch's bucket, (height, width)
    buckets = {tuple(added["time_ids"][0, 4:].tolist()) for _, added in seen}
    assert len(buckets) >= 2
    for hidden_shape, added in seen:
        width = sum(e.config.hidden_size for e in _encoders(tiny_sdxl_folder))
        assert hidden_shape[-1] == width                          # both encoders' hidden states, concatenated
        assert added["text_embeds"].shape == (hidden_shape[0], _encoders(tiny_sdxl_folder)[1].config.projection_dim)
        assert added["time_ids"].shape == (hidden_shape[0], 6)
    losses = [m["loss/log_step"] for m in read_metrics(run) if "loss/log_step" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert len(list((run / "samples").glob("*.jpg"))) >= 2
    ckpt = final_ckpt(logdir)
    before, after = checkpoint_weights(tiny_sdxl_folder), checkpoint_weights(ckpt)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part + ".")), part
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(ckpt)
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert (ckpt.parent / f"{ckpt.name}.safetensors").is_file()


def _encoders(folder: Path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    return (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))


def test_sdxl_frozen_text_encoders_stay_bit_exact(tiny_sdxl_folder, dataset, tmp_path):
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sdxl_folder, dataset, logdir, max_epochs=1,
                               disable_textenc_training=True)) == 0
    before, after = checkpoint_weights(tiny_sdxl_folder), checkpoint_weights(final_ckpt(logdir))
    for k in before:
        if k.startswith("text_encoder"):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))


@pytest.mark.parametrize("extra", [{}, {"prediction_type": "v_prediction", "enable_zero_terminal_snr": True}])
def test_sdxl_resume_mid_epoch_equals_straight_run(tiny_sdxl_folder, dataset, tmp_path, extra):
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    assert run_train(base_args(tiny_sdxl_folder, dataset, straight, max_epochs=2, **extra)) == 0
    assert run_train(base_args(tiny_sdxl_folder, dataset, first, max_epochs=2, max_steps=3, **extra)) == 0
    stopped = final_ckpt(first)
    assert run_train(base_args(tiny_sdxl_folder, dataset, second, max_epochs=2, resume_ckpt=str(stopped),
                               **extra)) == 0
    a, b = checkpoint_weights(final_ckpt(straight)), checkpoint_weights(final_ckpt(second))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the straight run by {worst}"


def test_sdxl_trains_only_the_second_text_encoder_when_optimizer_json_freezes_the_first(tiny_sdxl_folder, dataset,
                                                                                        tmp_path):
    """OneTrainer's TENC1/TENC2 split: optimizer.json's freeze_all on text_encoder_freezing keeps CLIP-L exact while
    OpenCLIP-bigG trains, with its own learning rate."""
    opt = tmp_path / "optimizer.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-3},
                               "text_encoder_freezing": {"freeze_all": True},
                               "text_encoder_2_overrides": {"lr": 5e-4}}))
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sdxl_folder, dataset, logdir, max_epochs=1, optimizer_config=str(opt),
                               lr=None)) == 0
    before, after = checkpoint_weights(tiny_sdxl_folder), checkpoint_weights(final_ckpt(logdir))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder_2."))
    lrs = [m for m in read_metrics(only_run(logdir)) if "hyperparameter/lr text encoder 2" in m]
    assert lrs and lrs[0]["hyperparameter/lr text encoder 2"] == pytest.approx(5e-4)
    assert all("hyperparameter/lr text encoder" not in m for m in read_metrics(only_run(logdir)))


def test_sdxl_with_cached_latents_validation_and_ema(tiny_sdxl_folder, dataset, tmp_path):
    """The latent cache's centre crops give their own time ids; validation builds SDXL's conditioning too."""
    vfile = tmp_path / "val.json"
    vfile.write_text(json.dumps({"val_split_mode": "automatic", "auto_split_proportion": 0.25, "seed": 3,
                                 "every_n_epochs": 1}))
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sdxl_folder, dataset, logdir, max_epochs=2, cache_latents=True,
                               latent_cache_dir=str(tmp_path / "cache"), validation_config=str(vfile),
                               ema_decay_rate=0.9, ema_update_interval=1)) == 0
    metrics = read_metrics(only_run(logdir))
    val = [m for m in metrics if any(k.startswith("loss/val") for k in m)]
    assert val and all(torch.isfinite(torch.tensor(v)) for m in val for k, v in m.items() if k.startswith("loss/"))
    ckpt = final_ckpt(logdir)
    assert (ckpt.with_name(ckpt.name + "_ema") / "text_encoder_2").is_dir()


def test_the_sdxl_24gb_preset_runs_end_to_end_on_the_tiny_model(tiny_sdxl_folder, dataset, tmp_path, monkeypatch):
    """examples/train_sdxl_24gb.json as shipped (its optimizer file, bf16 weights rounded stochastically, the step in
    the backward pass, activation recomputation, cached latents; UNet and both text encoders trained), only the
    model, data and size made tiny."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)   # the preset names its optimizer file relative to the repository
    logdir = tmp_path / "logs"
    argv = ["--config", "examples/train_sdxl_24gb.json", "--resume_ckpt", str(tiny_sdxl_folder),
            "--data_root", str(dataset), "--logdir", str(logdir), "--resolution", "64", "--batch_size", "2",
            "--max_epochs", "1", "--sample_prompts", "null", "--num_workers", "0",
            "--latent_cache_dir", str(tmp_path / "cache")]
    assert run_train(argv) == 0
    saved = json.loads((final_ckpt(logdir) / "train.json").read_text())
    assert saved["fused_backward_pass"] and saved["cache_latents"] and saved["gradient_checkpointing"]
    assert saved["weight_dtype"] == "bf16" and not saved["disable_textenc_training"]
    before, after = checkpoint_weights(tiny_sdxl_folder), checkpoint_weights(final_ckpt(logdir))
    for part in ("unet", "text_encoder", "text_encoder_2"):   # all three trained, stored in bf16
        trained = [k for k in after if k.startswith(part + ".") and after[k].is_floating_point()]
        assert all(after[k].dtype == torch.bfloat16 for k in trained), part
        assert any(not torch.equal(before[k].bfloat16(), after[k]) for k in trained), part
