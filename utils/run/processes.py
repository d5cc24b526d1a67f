"""Several processes (accelerate launch, DDP; doc/MULTI_GPU.md): how an epoch splits, and what they agree on.

With one process every function here is the identity or a no-op, and costs nothing.
"""
from __future__ import annotations

import math

import torch

from data.sampler import epoch_batches
from utils.run.run_state import Run


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum)


def accumulation_group_size(batch_index: int, n_batches: int, grad_accum: int, world_size: int = 1) -> float:
    """How many micro-batches share this one's optimizer step (the last group of an epoch may be short), per
    process. batch_index is this process's; n_batches counts the whole epoch before the DDP split. With N processes
    a step covers N * grad_accum consecutive epoch positions (rank r's batch i is position i * N + r) and DDP divides
    the summed gradient by N, so each process divides its loss by (real batches in the step) / N: the update is
    exactly one process's with N * grad_accum accumulation, also in a short last step (padding weighs 0)."""
    group_start = (batch_index // grad_accum) * grad_accum * world_size
    real = min(grad_accum * world_size, n_batches - group_start)
    return real if world_size == 1 else real / world_size


def epoch_plans(run: Run, epoch: int, *, whole: bool = False) -> list:
    """This process's batch plans of an epoch (whole: every process's, in epoch order)."""
    split = not whole and run.processes > 1
    return epoch_batches(run.scan.items, batch_size=run.cfg.batch_size, seed=run.cfg.seed, epoch=epoch,
                         resolutions=run.resolutions, rank=run.accelerator.process_index if split else 0,
                         world_size=run.processes if split else 1)


def epoch_batch_count(run: Run, epoch: int, plans: list) -> int:
    """The epoch's batches before the DDP split; this process's plans at positions beyond it are padding."""
    return len(plans) if run.processes == 1 else len(epoch_plans(run, epoch, whole=True))


def stand_in_batch(plan) -> dict:
    """One black image at the plan's size, empty caption: trained with weight 0 in place of a batch whose images
    all failed to load (or padding), only so that this process joins DDP's collectives."""
    width, height = plan.size
    return {"pixel_values": torch.zeros(1, 3, height, width), "captions": [""], "loss_scale": torch.zeros(1),
            "mask": None, "position": plan.position, "size": plan.size}


def agree_at_step(run: Run, group_loss: torch.Tensor, save_clock_due: bool) -> torch.Tensor:
    """N processes must decide alike at each step, or one waits forever in a collective the others never join.
    One all-reduce of five numbers per optimizer step carries the decisions; reading it is one host sync a step,
    which the finite-loss check (skip_nonfinite_steps, the default) or fp16's GradScaler make anyway:
    - the group loss, summed: a non-finite loss on any process skips the step on all of them;
    - SIGINT/SIGTERM seen by any process (a scheduler may signal only some): all stop after this step;
    - the main process's save clock: all save after this step;
    - the images trained since the last step, so that images_seen counts every process's.
    Returns the loss summed over processes (only its finiteness is used). One process: nothing to agree."""
    if run.processes == 1:
        return group_loss
    stops, st = run.stops, run.state
    local = [float(stops.pending_signal == "SIGINT"), float(stops.pending_signal == "SIGTERM"),
             float(run.is_main and save_clock_due), float(st.images_seen - stops.images_synced)]
    vec = torch.cat([group_loss.detach().reshape(1).double(), torch.tensor(local, dtype=torch.float64,
                                                                            device=run.device)])
    total, sigint, sigterm, save, images = run.accelerator.reduce(vec, "sum").tolist()
    st.images_seen = stops.images_synced = stops.images_synced + int(images)
    if sigint or sigterm:
        stops.requested = "SIGTERM" if sigterm else "SIGINT"
    stops.save_agreed = bool(save)
    return torch.tensor(total)


def sum_over_processes(run: Run, loss: torch.Tensor, *counts: int) -> tuple:
    """(loss, *counts) summed over all processes: the logged loss and images/s are the whole job's. Called only at
    logging steps and epoch ends, which every process reaches at the same step."""
    if run.processes == 1:
        return (loss, *counts)
    vec = torch.cat([loss.detach().reshape(1).double(), torch.tensor(counts, dtype=torch.float64, device=run.device)])
    total, *sums = run.accelerator.reduce(vec, "sum").tolist()
    return (torch.tensor(total), *(int(c) for c in sums))


def broadcast_from_main(run: Run, value):
    """The main process's value on every process (e.g. what it read from a file all must act on alike)."""
    if run.processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    box = [value]
    broadcast_object_list(box)
    return box[0]
