"""The DataLoader over an epoch's batch plans (the run's and the benchmark's), and ending its workers."""
from __future__ import annotations

import os
import signal

import torch


def default_workers(num_workers: int | None) -> int:
    """num_workers, or one fewer than the CPUs (at most 8): decoding and augmenting keep ahead of the GPU."""
    return num_workers if num_workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))


def make_loader(dataset, *, num_workers: int | None, pin_memory: bool):
    """Batches as the dataset plans them (each item is a whole batch), in order, prefetched by worker processes
    that keep going through a Ctrl-C (the main process decides when to stop, and saves first)."""
    workers = min(default_workers(num_workers), len(dataset))
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, worker_init_fn=workers_ignore_stop_signals,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


def close_loader(batches) -> None:
    """Ends a DataLoader iterator's worker processes now and waits for them. Torch does this itself when the
    iterator is exhausted or freed, but after an error the exception's traceback keeps the iterator (through the
    epoch's frames) alive until the interpreter exits. There torch skips its shutdown, and multiprocessing's exit
    handler sends the workers SIGTERM, which they ignore (workers_ignore_stop_signals), then waits for them
    forever: the run hung instead of ending. So every way out of the loop and cleanup closes it."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # None: no workers (num_workers 0), or no iterator
    if shutdown is None:
        return
    shutdown()  # asks each worker to stop and joins it (torch waits 5 s for one that does not)
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():  # stuck (in a decode, on a file system): SIGKILL is not ignorable
            worker.kill()
            worker.join(timeout=5)


def workers_ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; workers must keep feeding the batches the main process still needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # So does SIGTERM from torchrun/accelerate launch (os.killpg) or a scheduler: a worker killed by it makes the
    # DataLoader raise in the main process before it can save. Therefore multiprocessing's exit handler, which ends
    # leftover workers with SIGTERM, cannot end them: close_loader does, on every way out of the loop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
