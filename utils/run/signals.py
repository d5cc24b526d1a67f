"""Ctrl-C and SIGTERM: the first stops the run after the current step and saves; a second stops at once.

With several processes a signal may reach only some of them; it is recorded here and the processes agree at the
next step (utils/run/processes.py), so they all stop together.
"""
from __future__ import annotations

import signal

from utils.core.run_logging import get_logger
from utils.run.checkpoint import STATE_FILE, list_checkpoints
from utils.run.run_state import Run

log = get_logger()


def install_handlers(run: Run) -> None:
    stops = run.stops

    def handler(signum, _frame):
        stops.signals_seen += 1
        name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        if stops.signals_seen > 1:  # a second Ctrl-C: stop now, no save; the loop reports it in one line
            stops.abort_signal = signal.Signals(signum).name
            raise KeyboardInterrupt
        if run.processes > 1:  # it may reach only some processes: agree_at_step decides
            stops.pending_signal = name
            log.warning(f"\n{name} received by process {run.accelerator.process_index}: all processes stop after "
                        f"the next optimizer step (again to abort without saving)")
            return
        stops.requested = name
        log.info(f"\n{name} received: stopping after this step (again to abort without saving)")

    stops.old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(run: Run) -> None:
    for s, h in run.stops.old_handlers.items():
        signal.signal(s, h)
    run.stops.old_handlers = {}


def exit_code(name: str | None) -> int:
    return 143 if name == "SIGTERM" else 130


def abort_message(run: Run) -> str:
    """One line after a second SIGINT/SIGTERM: what was abandoned and which checkpoint to resume from. Every save
    is written under a temporary name and renamed when complete, so nothing half-written is left."""
    done = list_checkpoints(run.run_dir / "ckpts") if run.is_main else []
    if done:
        where = f"the newest complete checkpoint {done[-1]} is intact (resume: --resume_ckpt {done[-1]})"
    elif (run.models.folder / STATE_FILE).is_file():
        where = f"this run wrote no checkpoint; the one it resumed from, {run.models.folder}, is intact"
    else:
        where = "this run wrote no checkpoint"
    return (f"error: {run.stops.abort_signal} again: stopped at once, the interrupted save was not made or was "
            f"abandoned (nothing half-written is left); {where}")
