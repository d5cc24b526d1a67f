"""Saving a run and taking one up again: checkpoint folders, single-file exports, the trainer state.

The folder layout, atomic renames, pruning and the trainer state's file format are utils/run/checkpoint.py's;
this module decides what goes in them from the run, and puts a loaded state back into the run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from optimizer.build import eval_weights, set_train_mode
from optimizer.config import optimizer_config_to_json
from utils.core.run_logging import get_logger
from utils.core.file_writes import write_json_atomic
from utils.run.checkpoint import (TrainState, capture_rng, checkpoint_name, prune_checkpoints, restore_rng,
                                  save_checkpoint_folder, save_trainer_state)
from utils.run.config import config_to_dict, with_live_settings
from utils.run.loader import close_loader
from utils.run.run_state import Run
from utils.sd.ldm_export import save_single_file
from utils.sd.ema import ema_weights

log = get_logger()


def trainer_state(run: Run) -> dict:
    """What a resume needs beyond the weights."""
    return {
        "train_state": run.state.state_dict(),
        "optimizers": {p.name: p.optimizer.state_dict() for p in run.parts} if run.live.save_optimizer else {},
        "schedulers": {p.name: p.scheduler.state_dict() for p in run.parts},
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "validation": run.previews.history.state_dict(),
        "rng": capture_rng(run.generator),
        "processes": run.processes,  # batches_done and steps count per process
    }


def restore_trainer_state(run: Run, sd: dict) -> None:
    run.state = TrainState(**sd["train_state"])
    for part in run.parts:
        if part.name in sd["optimizers"]:
            part.optimizer.load_state_dict(sd["optimizers"][part.name])
        else:
            log.info(f"warning: no optimizer state for {part.name} in the checkpoint (save_optimizer was false); "
                     f"its optimizer starts fresh")
        if part.name in sd["schedulers"]:
            part.scheduler.load_state_dict(sd["schedulers"][part.name])
    if sd.get("scaler"):
        run.scaler.load_state_dict(sd["scaler"])
    if sd.get("validation"):
        run.previews.history.load_state_dict(sd["validation"])
    if run.ema is not None and sd.get("ema") is not None:
        run.ema.load_state_dict(sd["ema"])
    elif run.ema is not None:
        log.info("warning: the checkpoint has no EMA state; EMA starts from the current weights")
    restore_rng(sd["rng"], run.generator)
    run.stops.images_synced = run.state.images_seen
    if sd.get("processes", 1) != run.processes:
        log.info(f"warning: the checkpoint was trained with {sd.get('processes', 1)} process(es), this run has "
                 f"{run.processes}: its step count, LR schedule position and place in the epoch are per-process "
                 f"counts, so they do not carry over exactly (doc/MULTI_GPU.md)")
    set_train_mode(run.parts, True)  # a schedule-free state saved in eval mode must step in train mode
    log.info(f"resumed at epoch {run.state.epoch}, batch {run.state.batches_done}, step {run.state.global_step}")


def save_minutes(run: Run) -> float | None:
    """EveryDream2's rule: with no save interval at all, save every 20 minutes."""
    live = run.live
    if live.ckpt_every_n_minutes is not None:
        return live.ckpt_every_n_minutes
    return None if live.save_every_n_epochs else 20.0


def save_clock_due(run: Run) -> bool:
    minutes = save_minutes(run)
    return bool(minutes) and time.monotonic() - run.last_save_time >= minutes * 60


def save(run: Run, prefix: str = "") -> Path | None:
    """A resumable diffusers checkpoint (and a single-file export); only the main process writes."""
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        return None
    st, live = run.state, run.live
    if st.global_step == 0:
        log.info("no optimizer step taken yet: nothing to save")
        return None
    name = checkpoint_name(run.cfg.project_name, st.epoch, st.global_step, prefix)
    final = run.run_dir / "ckpts" / name

    def write(tmp: Path) -> None:
        write_model_folder(run, tmp)
        save_trainer_state(tmp, trainer_state(run))
        write_json_atomic(tmp / "train.json", config_to_dict(with_live_settings(run.cfg, live)))
        write_json_atomic(tmp / "optimizer.json", optimizer_config_to_json(run.opt_cfg))

    with eval_weights(run.parts):  # schedule-free optimizers: the averaged weights are the model
        save_checkpoint_folder(final, write)
    saved = [final]
    if run.ema is not None:
        with ema_weights(run.ema, run.models.trained_params):
            saved.append(save_checkpoint_folder(final.with_name(name + "_ema"),
                                                lambda tmp: write_model_folder(run, tmp)))
    run.last_save_time = time.monotonic()
    for folder in saved:
        log.info(f"saved {folder}")
        if not run.cfg.no_save_ckpt:
            out_dir = Path(run.cfg.save_ckpt_dir) if run.cfg.save_ckpt_dir else run.run_dir / "ckpts"
            out_dir.mkdir(parents=True, exist_ok=True)
            path = save_single_file(folder, out_dir / f"{folder.name}.safetensors", half=not live.save_full_precision,
                                    zero_terminal_snr=run.cfg.enable_zero_terminal_snr)
            log.info(f"saved {path}")
    prune_checkpoints(run.run_dir / "ckpts", run.cfg.keep_last_n, protect={final})
    return final


def write_model_folder(run: Run, folder: Path) -> None:
    """A folder StableDiffusionPipeline.from_pretrained loads; frozen parts are copied byte for byte. The plain
    modules (sd.unet) are saved: DDP and torch.compile only wrap them for the step."""
    models = run.models
    src = models.folder
    parts = [("unet", models.sd.unet, models.train_unet),
             *((name, module, trained) for (name, module), trained
               in zip(models.sd.text_encoder_parts(), models.train_text_encoders))]
    for part, module, trained in parts:
        if trained:
            module.save_pretrained(folder / part, safe_serialization=True)
        else:
            shutil.copytree(src / part, folder / part)
    for part in ["vae", *(name for name, _ in models.sd.tokenizer_parts())]:
        if (src / part).exists():
            shutil.copytree(src / part, folder / part)
    # the scheduler config as trained (a prediction_type override included), so a resume sees the same
    (folder / "scheduler").mkdir()
    write_json_atomic(folder / "scheduler" / "scheduler_config.json", models.sd.scheduler_config)
    shutil.copy2(src / "model_index.json", folder / "model_index.json")


def rescue_save(run: Run) -> None:
    """After an error in the loop the weights are those of the last optimizer step: keep them if we can."""
    if run.processes > 1:  # the others may be inside a collective save() would never meet
        log.warning("not saving: with several processes the error may be on this one only; the last checkpoint "
                    "is intact")
        return
    close_loader(run.batches)  # its workers' memory, and no prefetching while saving
    run.batches = None
    try:
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        save(run, prefix="interrupted-")
    except Exception as e:  # the run is already failing; say why the rescue failed too
        log.info(f"could not save the current state ({type(e).__name__}: {e}); the last checkpoint is intact")
