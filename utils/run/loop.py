"""The training loop, top to bottom: train() runs the epochs, train_epoch() the steps of one, and each phase of a
step is one call: micro-step, agree across processes, optimizer step, EMA, then log, validate, sample, save, stop.

train.py calls preflight (utils/run/preflight.py), setup (utils/run/setup.py), train and cleanup, in that order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from data.dataset import BatchDataset
from data.sampler import write_schedule
from utils.core.config_schema import ConfigError
from utils.core.run_logging import get_logger
from utils.eval.validation import validation_due
from utils.run.config import reload_live_settings
from utils.run.loader import close_loader, make_loader
from utils.run.previews import sample, validate
from utils.run.processes import (accumulation_group_size, agree_at_step, broadcast_from_main, epoch_batch_count,
                                 epoch_plans, stand_in_batch)
from utils.run.run_state import Run
from utils.run.saving import rescue_save, save, save_clock_due
from utils.run.signals import abort_message, exit_code, install_handlers, restore_handlers
from utils.run.step_log import (add_to_window, log_epoch, new_window, print_end_summary, stage_window,
                                write_staged)
from utils.run.train_step import (PHASE_AFTER, PHASE_DATA, PHASE_OPTIMIZER, StopTraining, discard_step, due,
                                  micro_step, optimizer_step)
from utils.sd.text_conditioning import PromptCache

log = get_logger()

OOM_ADVICE = ("error: CUDA out of memory. Lower, in this order: batch_size (now {batch_size}; grad_accum keeps the "
              "effective batch), resolution (now {resolution}); or turn on gradient_checkpointing, use "
              "mixed_precision bf16/fp16, attn_type slice, ema_device cpu, disable_textenc_training. Trying to save "
              "the current weights as an interrupted checkpoint.")


def train(run: Run, final_outputs: bool = True) -> int:
    """Train to max_epochs / max_steps; then sample and save (final_outputs=False skips both: benchmarks).
    Returns the process exit code: 0 done, 130/143 stopped by SIGINT/SIGTERM (also when a second one aborted the
    interrupted save), 1 stopped by an error."""
    install_handlers(run)
    try:
        return _train(run, final_outputs)
    except KeyboardInterrupt:
        if run.stops.abort_signal is None:
            raise  # not our handler's doing
        log.info(abort_message(run))
        return exit_code(run.stops.abort_signal)
    finally:
        _close_batches(run)


def _train(run: Run, final_outputs: bool) -> int:
    cfg, st = run.cfg, run.state
    from tqdm.auto import tqdm
    run.last_save_time = run.started = time.monotonic()
    epochs_bar = tqdm(total=cfg.max_epochs, initial=st.epoch, disable=not run.is_main, unit="epoch", position=0,
                      desc="epochs", dynamic_ncols=True)
    bar = tqdm(total=run.steps.total_steps, initial=st.global_step, disable=not run.is_main, unit="step",
               position=1, dynamic_ncols=True)
    run.window = new_window(run)
    try:
        if st.global_step == 0:  # a fresh run: the baseline before any step (a resume does not repeat it)
            if run.previews.sets:
                validate(run)
            if run.previews.samples.current.generate_pretrain_samples:
                sample(run)
        while st.epoch < cfg.max_epochs and not run.finished() and not run.stops.requested:
            reload_live(run)
            train_epoch(run, bar)
            epochs_bar.n = st.epoch
            epochs_bar.refresh()
    except StopTraining as e:
        log.info(f"error: {e}")
        return 1
    except torch.OutOfMemoryError:
        run.out_of_memory = True
        log.info(OOM_ADVICE.format(batch_size=cfg.batch_size, resolution=cfg.resolution))
        rescue_save(run)
        return 1
    finally:
        _close_batches(run)  # before the saves below: the workers' memory, and no prefetching meanwhile
        write_staged(run, bar)
        bar.close()
        epochs_bar.close()
    if run.stops.requested:
        log.info(f"{run.stops.requested}: saving an interrupted checkpoint")
        save(run, prefix="interrupted-")
        # a process exiting non-zero makes the launcher (torchrun) kill the rest: not while main still writes
        run.accelerator.wait_for_everyone()
        return exit_code(run.stops.requested)
    if st.global_step == 0:  # nothing trained: no samples or checkpoint of an untrained model, and no "done"
        raise ConfigError("the run ended without a single optimizer step (no batch could be trained); see the "
                          "warnings above, and check the data with python train.py --config <your config> --check")
    if final_outputs:
        sample(run)
        final = save(run, prefix="" if cfg.no_prepend_last else "last-")
        print_end_summary(run, final)
    return 0


@dataclass
class EpochProgress:
    """One epoch's running sums, and what tells a real step from one whose images all failed to load."""
    loss: torch.Tensor                       # summed micro-batch losses (the epoch's mean is logged)
    group_loss: torch.Tensor                 # the current optimizer step's
    step_images: int                         # images_seen at the last step: a step must exceed it to be one
    steps_before: int                        # global_step when the epoch (or the resume) started
    first_batch: int
    micro: int = 0
    failed: dict = field(default_factory=dict)   # files of batches that failed whole (an ordered set)
    t0: float = field(default_factory=time.perf_counter)


def train_epoch(run: Run, bar) -> None:
    """One epoch from where the state stands (mid-epoch after a resume) to its end, max_steps or a stop."""
    st = run.state
    plans = plan_epoch(run, st.epoch)
    ep = EpochProgress(loss=torch.zeros((), device=run.device), group_loss=torch.zeros((), device=run.device),
                       step_images=st.images_seen, steps_before=st.global_step, first_batch=st.batches_done)
    n_batches = epoch_batch_count(run, st.epoch, plans)
    bar.set_description(f"epoch {st.epoch + 1}/{run.cfg.max_epochs}")
    for i, batch in enumerate(annotated(open_batches(run, plans), PHASE_DATA), start=st.batches_done):
        boundary = (i + 1) % run.cfg.grad_accum == 0 or i + 1 == len(plans)
        train_micro_batch(run, ep, batch, plans[i], i, n_batches, sync_grads=boundary)        # micro-step
        if not boundary:
            continue
        with torch.profiler.record_function(PHASE_OPTIMIZER):
            group_loss = agree_at_step(run, ep.group_loss, save_clock_due(run))            # agree across processes
            trained = st.images_seen > ep.step_images
            norms = optimizer_step(run, group_loss) if trained else discard_step(run)       # optimizer step
            ep.group_loss = torch.zeros((), device=run.device)
            if run.ema is not None and trained:
                run.ema.update(run.models.trained_params)                                   # EMA
        st.batches_done = i + 1
        if not trained:  # every image of the step failed to load, on every process: not a step
            if run.stops.requested:
                break
            continue
        ep.step_images = st.images_seen
        st.global_step += 1
        bar.update(1)
        with torch.profiler.record_function(PHASE_AFTER):
            after_step(run, norms, bar)                                 # log, validate, sample, save
        if run.finished() or run.stops.requested:                       # stop
            break
    if st.batches_done == len(plans):
        end_epoch(run, ep, bar)


def train_micro_batch(run: Run, ep: EpochProgress, batch: dict | None, plan, i: int, n_batches: int,
                      sync_grads: bool) -> None:
    """Forward and backward of batch i (or of a weight-0 stand-in, so that DDP's collectives still meet)."""
    for path, reason in (batch or {}).get("skipped", []):
        log.info(f"warning: skipped {path} at load time: {reason}")
    if batch is None:
        names = [run.scan.items[j].rel_path for j in plan.indices]
        ep.failed.update(dict.fromkeys(names))
        log.info(f"warning: every image of a batch failed to load ({', '.join(names)}); not trained")
    if run.processes > 1 and (batch is None or batch["position"] >= n_batches):
        # Padding (the epoch does not split evenly), or every image failed to load: DDP still needs this process's
        # forward and backward (its collectives), with weight 0 so nothing is trained twice.
        micro_step(run, batch or stand_in_batch(plan), 1, sync_grads=sync_grads, weight=0.0)
        return
    if batch is None:
        return
    loss = micro_step(run, batch, accumulation_group_size(i, n_batches, run.cfg.grad_accum, run.processes),
                      sync_grads=sync_grads)
    ep.group_loss += loss
    ep.loss += loss
    ep.micro += 1
    add_to_window(run.window, loss, len(batch["captions"]))
    run.state.images_seen += len(batch["captions"])


def after_step(run: Run, norms: dict, bar) -> None:
    step, live, previews = run.state.global_step, run.live, run.previews
    write_staged(run, bar)  # the last log step's: its copy finished while this step was queued
    if due(step, live.log_step):
        stage_window(run, norms)
        if run.log_hook:
            run.log_hook(step)
    if previews.sets and validation_due(step, run.steps.per_epoch, previews.validation.every_n_epochs):
        validate(run)
    if due(step, previews.samples.current.every_n_steps or live.sample_steps):
        sample(run)
    if run.stops.save_agreed if run.processes > 1 else save_clock_due(run):
        save(run)


def end_epoch(run: Run, ep: EpochProgress, bar) -> None:
    st, live = run.state, run.live
    if st.global_step == ep.steps_before and st.batches_done > ep.first_batch:  # nothing of this epoch trained
        if st.global_step:
            rescue_save(run)  # the earlier epochs' steps were real: keep them
        raise ConfigError(nothing_loaded(st.epoch, list(ep.failed)))
    write_staged(run, bar)  # the epoch's line below waits for the GPU anyway
    log_epoch(run, ep.loss, ep.micro, ep.t0)
    st.epoch += 1
    st.batches_done = 0
    # Saved after the epoch's last step, so "ep N" holds exactly N epochs (EveryDream2 saved one step later).
    if (live.save_every_n_epochs and st.epoch % live.save_every_n_epochs == 0 and st.epoch < run.cfg.max_epochs
            and st.epoch >= live.save_ckpts_from_n_epochs):
        save(run)


def nothing_loaded(epoch: int, failed: list[str]) -> str:
    listed = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
    return (f"epoch {epoch + 1}: every image failed to load ({len(failed)} file(s): {listed}; the reasons are in "
            f"the warnings above), so nothing was trained in it. Fix or replace these files (python train.py "
            f"--config <your config> --check decodes every image and lists the bad ones), then run again")


def plan_epoch(run: Run, epoch: int) -> list:
    """This process's batch plans of the epoch; write_schedule writes the whole epoch's (with N processes, line p
    is trained by process p % N)."""
    plans = epoch_plans(run, epoch)
    if run.cfg.write_schedule and run.is_main:
        write_schedule(epoch_plans(run, epoch, whole=True), run.scan.items,
                       run.run_dir / f"ep{epoch}_batch_schedule.txt")
    return plans


def open_batches(run: Run, plans: list):
    """The epoch's batches from where the state stands; the iterator is kept so that its workers can be ended
    whatever happens (close_loader)."""
    start = run.state.batches_done
    dataset = BatchDataset(run.scan.items, plans[start:], seed=run.cfg.seed, epoch=run.state.epoch,
                           first_position=start, latents=run.latent_index)
    loader = make_loader(dataset, num_workers=run.cfg.num_workers, pin_memory=run.device.type == "cuda")
    _close_batches(run)  # an earlier epoch's, left unfinished by a stop
    run.batches = iter(loader)
    return run.batches


def _close_batches(run: Run) -> None:
    batches, run.batches = run.batches, None
    close_loader(batches)


def annotated(iterable, name: str):
    """Yield from `iterable`, each fetch inside a profiler range called `name` (nearly free when not profiling)."""
    it, end = iter(iterable), object()
    while True:
        with torch.profiler.record_function(name):
            item = next(it, end)
        if item is end:
            return
        yield item


def reload_live(run: Run) -> None:
    """EveryDream2's load_settings_every_epoch: re-read train.json for the keys that may change mid-run. The main
    process reads once for all: a file saved between two reads must not leave processes with different values."""
    if not (run.cfg.load_settings_every_epoch and run.config_path):
        return
    try:
        live, changes = reload_live_settings(run.config_path, run.live) if run.is_main else (run.live, {})
    except ConfigError as e:
        log.info(f"warning: load_settings_every_epoch: {e}; keeping the current settings")
        live, changes = run.live, {}
    run.live, changes = broadcast_from_main(run, (live, changes))
    for key, (old, new) in changes.items():
        log.info(f"epoch {run.state.epoch + 1}: {key} {old} -> {new} (from {run.config_path})")
    if "clip_skip" in changes and run.models.te_cache is not None:
        run.models.te_cache = PromptCache()  # cached conditioning came from the other layer


def cleanup(run: Run) -> None:
    """Whatever stage the run reached: signal handlers back, workers ended, torch settings undone, files closed."""
    restore_handlers(run)  # first: a further Ctrl-C is the default's again
    _close_batches(run)
    run.torch_settings.close()
    if run.ema is not None:
        run.ema.close()
    if run.metrics is not None:
        run.metrics.close()
    if run.log_handler is not None:
        log.removeHandler(run.log_handler)
        run.log_handler.close()
