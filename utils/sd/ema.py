"""Exponential moving average of model weights (UNet and/or text encoder parameters, as one list).

    ema = EMA(params, decay=0.9999, device="cpu", update_interval=1)
    ...after each optimizer step:      ema.update(params)
    ...sampling or saving the EMA model: with ema_weights(ema, params): pipeline(...) / unet.save_pretrained(...)
    ...resumable checkpoint:           ema.state_dict() / ema.load_state_dict(sd)

`params` is always the same list in the same order (a list, not a generator: it is walked several times).
The EMA copy is kept in float32 on `device`.

CPU EMA of GPU weights (device="cpu", the low-VRAM option) does not block: update() queues a device->host copy
of the weights into pinned buffers on the current CUDA stream and returns; a background thread waits for that
copy (a CUDA event) and does the lerp on the CPU while the GPU trains on. The GPU pays only for the copy
(~0.15 s for SD1.5's fp32 UNet + text encoder over PCIe 4), once per update_interval steps; EveryDream2's
synchronous copy + CPU update took ~4 s. Anything that reads the EMA weights waits for the pending update
first. The same code runs synchronously on CPU-only machines, and the threaded path computes bit-identical
results (it is the same lerp, only later).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor


def ema_decay_from_target(strength_target: float, total_steps: int, update_interval: int) -> float:
    """EveryDream2's ema_strength_target: the decay d with d ** (total_steps / update_interval) == target, i.e.
    the weight the starting model keeps in the EMA after the whole run. Steps are optimizer steps."""
    if not 0.0 < strength_target < 1.0:
        raise ValueError(f"ema_strength_target must be in (0, 1), got {strength_target}")
    if total_steps <= 0 or update_interval < 1:
        raise ValueError(f"need total_steps > 0 and update_interval >= 1, got {total_steps}, {update_interval}")
    return strength_target ** (update_interval / total_steps)


def _lerp_into(dst: list[Tensor], src: list[Tensor], weight: float) -> None:
    """dst += weight * (src - dst), i.e. dst = dst*(1-weight) + src*weight, on dst's device and dtype."""
    src = [s if (s.device == d.device and s.dtype == d.dtype) else s.to(device=d.device, dtype=d.dtype)
           for d, s in zip(dst, src)]
    torch._foreach_lerp_(dst, src, weight)


class EMA:
    """EMA weights: ema = ema*decay + param*(1-decay), applied on every `update_interval`-th call of update()."""

    def __init__(self, params, *, decay: float, device: str | torch.device = "cpu", update_interval: int = 1,
                 overlap: bool | None = None):
        """overlap: do the update's lerp in a background thread after a non-blocking copy. None (default): on
        when the EMA lives on the CPU and the parameters do not."""
        params = list(params)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update_interval must be >= 1, got {update_interval}")
        if not params:
            raise ValueError("EMA needs at least one parameter")
        if any(not p.is_floating_point() for p in params):
            raise TypeError("EMA parameters must be floating point")
        self.decay = float(decay)
        self.update_interval = int(update_interval)
        self.device = torch.device(device)
        offloaded = self.device.type == "cpu" and any(p.device.type != "cpu" for p in params)
        self.overlap = offloaded if overlap is None else bool(overlap)
        # Pinned host memory makes device<->host copies fast and lets them run asynchronously.
        self._pin = offloaded and any(p.is_cuda for p in params) and torch.cuda.is_available()
        with torch.no_grad():
            self.shadow = [self._host_or_device_buffer(p, torch.float32).copy_(p.detach()) for p in params]
        self.optimizer_steps = 0   # calls of update(): its interval counts these
        self.num_updates = 0       # updates actually applied
        self._staging: list[Tensor] | None = None
        self._stored: list[Tensor] | None = None
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _host_or_device_buffer(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        if self.device.type == "cpu":
            return torch.empty(p.shape, dtype=dtype, device="cpu", pin_memory=self._pin)
        return torch.empty(p.shape, dtype=dtype, device=self.device)

    def _check(self, params) -> list[Tensor]:
        params = list(params)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        for i, (p, s) in enumerate(zip(params, self.shadow)):
            if p.shape != s.shape:
                raise ValueError(f"EMA parameter {i}: shape {tuple(p.shape)} != {tuple(s.shape)}")
        return params

    def _finish(self) -> None:
        """Wait for a queued background update (and re-raise its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _lerp_staged(self, event, weight: float) -> None:
        if event is not None:
            event.synchronize()  # the device->host copy into the staging buffers has landed
        with torch.no_grad():
            _lerp_into(self.shadow, self._staging, weight)

    def update(self, params) -> bool:
        """Call once per optimizer step. Returns True when this call applied an update."""
        if self._stored is not None:
            raise RuntimeError("EMA.update() while the EMA weights are swapped in: call restore() first")
        params = self._check(params)
        self.optimizer_steps += 1
        if self.optimizer_steps % self.update_interval:
            return False
        self._finish()
        weight = 1.0 - self.decay
        with torch.no_grad():
            if not self.overlap:
                _lerp_into(self.shadow, [p.detach() for p in params], weight)
            else:
                if self._staging is None:
                    self._staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)
                                     for p in params]
                for buf, p in zip(self._staging, params):
                    buf.copy_(p.detach(), non_blocking=self._pin)
                event = None
                cuda_device = next((p.device for p in params if p.is_cuda), None)
                if cuda_device is not None:
                    # Recorded on the stream the copies were queued on; later work on that stream (the next
                    # optimizer step) runs after them, so the snapshot is of this step's weights.
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(cuda_device))
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema-update")
                self._pending = self._executor.submit(self._lerp_staged, event, weight)
        self.num_updates += 1
        return True

    def copy_to(self, params) -> None:
        """Write the EMA weights into `params` (cast to their dtype and device)."""
        params = self._check(params)
        self._finish()
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)

    def copy_from(self, params) -> None:
        """Set the EMA weights from `params`, e.g. the weights of an EMA model saved earlier (ema_resume_model)."""
        params = self._check(params)
        self._finish()
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                s.copy_(p.detach())

    def store(self, params) -> None:
        """Keep a copy of `params` (in host memory) for restore()."""
        if self._stored is not None:
            raise RuntimeError("EMA.store() twice without restore()")
        params = self._check(params)
        self._finish()
        with torch.no_grad():
            if self._staging is not None:  # idle between updates: reuse it rather than allocate again
                for buf, p in zip(self._staging, params):
                    buf.copy_(p.detach())
                self._stored = self._staging
            else:
                self._stored = [p.detach().to("cpu", copy=True) for p in params]

    def restore(self, params) -> None:
        """Put back the weights saved by store()."""
        if self._stored is None:
            raise RuntimeError("EMA.restore() without store()")
        params = self._check(params)
        with torch.no_grad():
            for p, b in zip(params, self._stored):
                p.copy_(b)
        self._stored = None

    def state_dict(self) -> dict:
        """For the resumable checkpoint. The tensors are the live EMA buffers (save them, do not modify them)."""
        self._finish()
        return {"decay": self.decay, "update_interval": self.update_interval,
                "optimizer_steps": self.optimizer_steps, "num_updates": self.num_updates,
                "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore weights and counters. decay and update_interval stay as configured for this run."""
        self._finish()
        shadow = state["shadow"]
        self._check(shadow)
        with torch.no_grad():
            for s, t in zip(self.shadow, shadow):
                s.copy_(t)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.num_updates = int(state["num_updates"])

    def close(self) -> None:
        """Finish a pending update and stop the background thread (a later update starts a new one)."""
        self._finish()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


@contextmanager
def ema_weights(ema: EMA | None, params):
    """Swap the EMA weights into `params` for the duration (sampling, saving the EMA model), then restore
    the trained weights, also on error. A no-op when ema is None."""
    params = list(params)
    if ema is None:
        yield
        return
    ema.store(params)
    try:
        ema.copy_to(params)
        yield
    finally:
        ema.restore(params)
