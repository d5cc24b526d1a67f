"""AdamW8bit / Lion8bit with bitsandbytes' own kernels, applied to groups of tensors at once.

bitsandbytes' AdamW8bit and Lion8bit step each parameter tensor on its own: one kernel launch plus Python
overhead per tensor. SD1.5 (UNet + text encoder) has 882 trainable tensors; on one H100 bitsandbytes' step takes
69-87 ms (Lion8bit 54-60 ms), of which its 8-bit kernel itself needs about 27 ms (2 states; one launch over all
983M parameters). Grouped8bit runs the same math with the same kernels
(`bitsandbytes.functional.optimizer_update_8bit_blockwise` / `optimizer_update_32bit`) on chunks of tensors:
31 ms (Lion 19 ms) for the same model, bit-identical results (measured 2026-11-23, torch 2.11, bnb 0.50.2).

- Layout (optimizer/grouped8bit_layout.py), planned at the first step from the parameters (their order, size,
  device and dtype):
  - tensors of at least `direct_elements` (4M) elements: a chunk each, stepped in place with bitsandbytes'
    per-tensor call (for them the launch overhead is small against the kernel; a copy would cost more);
  - other tensors of at least 4,096 elements (bitsandbytes' min_8bit_size): packed into chunks of at most
    `chunk_elements` (16M) elements, each tensor starting at a multiple of 256, the quantization block size.
    No block spans two tensors, so each tensor's blocks, absmax values and 8-bit codes are exactly those
    bitsandbytes computes for it alone;
  - smaller tensors: chunks with fp32 state (bitsandbytes' 32-bit update is elementwise: packed without gaps).
- Each chunk keeps its state (uint8 state1/state2 + fp32 absmax1/absmax2, or fp32 state1/state2; Lion has only
  state1) and its step count. Per step, a packed chunk's gradients and parameters are copied into a temporary
  flat gradient and parameter buffer (one pair per device and dtype, as large as the largest packed chunk:
  128 MiB for fp32, reused by every chunk), the kernel runs once on the flat buffers, and the parameters are
  copied back. The gaps between tensors in the gradient buffer are zeroed first (the buffer holds the previous
  chunk's values), so their state stays exactly 0 and never raises a block's absmax.
- Parameters whose .grad is None in a step get a zero gradient and are not written back: their weights stay
  unchanged, but their moments decay that step (bitsandbytes skips them entirely) and the chunk's step count
  advances. A chunk where no parameter has a gradient is skipped, as bitsandbytes skips a parameter.
- lr, betas, eps and weight_decay are read from param_groups[0] at every step (LR schedulers work); one
  parameter group only. GradScaler works: unscale_ and step only use param_groups and .grad.
- state_dict() / load_state_dict() are torch.optim.Optimizer's: each chunk's state sits under its first
  parameter, with a marker (STATE_MARKER) and the chunk's parameter indices. Loading bitsandbytes' per-tensor
  state (grouped_8bit_step false in optimizer.json) raises a ConfigError that says how to resume; so does
  loading this layout into bitsandbytes' classes as built here (AdamW8bit / Lion8bit below).
- step_in_backward() (train.json fused_backward_pass): each chunk is stepped by a hook as soon as the backward
  pass has accumulated all its gradients, which are then freed; step() afterwards steps the chunks left over.
  With overlap=True (train.json overlap_optimizer_step) those chunk steps run on a second CUDA stream, next to
  the rest of the backward pass, and step() makes the current stream wait for them.
- triton=True (optimizer.json triton_8bit_step, AdamW only): our Triton kernel (optimizer/triton8bit.py) steps
  the 8-bit chunks instead: it reads the gradients and writes the weights in place (no copies into the flat
  buffers), all chunks in one launch in step(), in bitsandbytes' state format (not bit-identical). A weight or
  gradient in another memory layout (channels_last) is stepped through a contiguous copy, its chunk in a launch
  of its own. A chunk where some parameter has no gradient, or a gradient of another dtype, takes the copying
  path with bitsandbytes' kernel that step.
- stochastic_rounding=True (train.json weight_dtype bf16): bf16 weights are stepped in fp32 (the flat buffers of
  bf16 chunks are fp32; an in-place tensor goes through an fp32 copy; the Triton kernel computes in fp32 anyway)
  and rounded back to bf16 stochastically (optimizer/stochastic_rounding.py), seeded by step and chunk.
"""
from __future__ import annotations

import functools
import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

from optimizer import triton8bit
from optimizer.stochastic_rounding import round_to_bf16_, step_seed
# BLOCK_SIZE and MIN_8BIT_SIZE are bitsandbytes' numbers; the layout defines them, callers import them from here too
from optimizer.grouped8bit_layout import BLOCK_SIZE, MIN_8BIT_SIZE, Chunk, plan_chunks
from utils.core.config_schema import ConfigError

DEFAULT_CHUNK_ELEMENTS = 2 ** 24   # 64 MiB per fp32 buffer
DEFAULT_DIRECT_ELEMENTS = 2 ** 22  # H100, SD1.5: 2**20..2**23 within 6%; no in-place tensors: 20% slower
STATE_MARKER = "grouped_8bit"   # in every chunk's state; the value is the format version
FORMAT_VERSION = 1
KINDS = {"adam": "AdamW8bit", "lion": "Lion8bit"}


class Grouped8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit (kind "adam") or Lion8bit (kind "lion") stepped chunk by chunk instead of tensor
    by tensor; the same result as bitsandbytes' per-tensor classes (bit-exact on CPU), see the module docstring.
    Lion ignores eps (bitsandbytes' Lion8bit passes 0)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, kind: str = "adam", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 direct_elements: int = DEFAULT_DIRECT_ELEMENTS, triton: bool = False,
                 stochastic_rounding: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if chunk_elements < MIN_8BIT_SIZE:
            raise ValueError(f"chunk_elements must be at least {MIN_8BIT_SIZE}, got {chunk_elements}")
        if triton and kind != "adam":
            raise ValueError("triton: the Triton 8-bit kernel is written for AdamW only")
        self.kind = kind
        self.triton = triton
        self.stochastic_rounding = stochastic_rounding
        # the Triton kernel's launch shape (tests/gpu/test_triton8bit_cuda.py times others); set before the first step
        self.triton_tuning = dict(segment=triton8bit.SEGMENT, num_warps=triton8bit.NUM_WARPS, lookup=True)
        self.chunk_elements = int(chunk_elements)
        self.direct_elements = int(direct_elements)
        self._chunks: list[Chunk] | None = None            # built at the first step
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # (device, dtype) -> (grad, param)
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._triton_maps: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._triton_rows: dict[tuple[int, ...], torch.Tensor] = {}   # chunk positions -> the launch's segment rows
        self._arrived: list[set] | None = None   # step_in_backward: per chunk, its tensors with a gradient
        self._stream = None                      # step_in_backward(overlap=True): the CUDA stream the chunks step on
        self.record_grad_norm = False            # sum the squared gradient norms of the chunks stepped
        self._grad_sq: torch.Tensor | None = None
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} takes one parameter group")
        super().add_param_group(param_group)

    # --- layout ---

    def _plan(self) -> list[Chunk]:
        return plan_chunks(self.param_groups[0]["params"], chunk_elements=self.chunk_elements,
                           direct_elements=self.direct_elements, owner=type(self).__name__)

    def _build(self) -> None:
        params = self.param_groups[0]["params"]
        chunks = self._plan()
        sizes: dict[tuple, int] = {}
        for c in chunks:
            if not c.direct:
                key = (c.device, self._step_dtype(c))
                sizes[key] = max(sizes.get(key, 0), c.length)
        self._buffers = {(device, dtype): (torch.zeros(n, dtype=dtype, device=device),
                                           torch.zeros(n, dtype=dtype, device=device))
                         for (device, dtype), n in sizes.items()}
        for c in (c for c in chunks if not c.direct):
            grad_buf, param_buf = self._buffers[(c.device, self._step_dtype(c))]
            for i, off in zip(c.indices, c.offsets):
                p = params[i]
                c.grad_views.append(grad_buf[off:off + p.numel()].view(p.shape))
                c.param_views.append(param_buf[off:off + p.numel()].view(p.shape))
            ends = [off + params[i].numel() for i, off in zip(c.indices, c.offsets)]
            c.gap_views = [grad_buf[end:start] for end, start in zip(ends, c.offsets[1:]) if start > end]
        if self.triton:
            for device in {c.device for c in chunks if c.eight_bit}:
                triton8bit.check_available(device, allow_interpreter=True)
        for c in chunks:
            state = self.state.get(params[c.indices[0]])
            if state:   # loaded before the first step
                self._check_state(state, c, c.indices[0])
        self._chunks = chunks

    def _rounds(self, c: Chunk) -> bool:
        return self.stochastic_rounding and c.dtype == torch.bfloat16

    def _step_dtype(self, c: Chunk) -> torch.dtype:
        """The dtype a chunk's update is computed in: fp32 for bf16 weights rounded stochastically."""
        return torch.float32 if self._rounds(c) else c.dtype

    def _new_state(self, c: Chunk) -> dict:
        state = {"step": 0, STATE_MARKER: FORMAT_VERSION, "params": list(c.indices)}
        names = ("state1", "state2") if self.kind == "adam" else ("state1",)
        for i, name in enumerate(names):
            if c.eight_bit:
                blocks = math.ceil(c.length / BLOCK_SIZE)
                state[name] = torch.zeros(c.length, dtype=torch.uint8, device=c.device)
                state[f"absmax{i + 1}"] = torch.zeros(blocks, dtype=torch.float32, device=c.device)
            else:
                state[name] = torch.zeros(c.length, dtype=torch.float32, device=c.device)
        return state

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """bitsandbytes' fill_qmap: the signed dynamic map for state1, the unsigned one for state2."""
        if device not in self._qmaps:
            self._qmaps[device] = (F.create_dynamic_map(signed=True).to(device),
                                   F.create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    # --- step ---

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._chunks is None:
            self._build()
        if self._stream is not None:   # what follows (the next forward pass) reads the weights stepped there
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        # with backward steps on, the chunks stepped during the backward pass have no gradient left: this steps
        # the rest (chunks with a parameter that got no gradient this step)
        launch: list = []   # the Triton kernel's chunks, stepped together
        for c in self._chunks:
            self._step_chunk(c, launch)
        self._launch_triton(launch)
        if self._arrived is not None:
            self._arrived = [set() for _ in self._chunks]
        return loss

    def _step_chunk(self, c: Chunk, launch: list | None = None) -> None:
        """Step one chunk; with the Triton kernel and a `launch` list, add it there to be stepped with others."""
        group = self.param_groups[0]
        params = group["params"]
        grads = [params[i].grad for i in c.indices]
        present = [g is not None for g in grads]
        if not any(present):
            return
        if any(g.is_sparse for g in grads if g is not None):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        if self.kind == "lion":
            eps = 0.0   # bitsandbytes' Lion8bit
        if self.record_grad_norm:
            norms = torch._foreach_norm([g for g in grads if g is not None])
            squared = torch.stack(norms).float().square().sum()
            self._grad_sq = squared if self._grad_sq is None else self._grad_sq + squared
        state = self.state[params[c.indices[0]]]
        if not state:   # first step of this chunk (or a loaded state that has none for it)
            state.update(self._new_state(c))
        state["step"] += 1
        if self.triton and c.eight_bit and all(present) and all(g.dtype == c.dtype for g in grads):
            if launch is None or not all(g.is_contiguous() and params[i].is_contiguous()
                                         for g, i in zip(grads, c.indices)):
                self._launch_triton([(c, state, grads)])   # alone: its contiguous copies live only for its launch
            else:
                launch.append((c, state, grads))
            return
        if c.direct:
            self._step_in_place(c, state, params[c.indices[0]], grads[0], lr, beta1, beta2, eps, wd)
            return
        grad_buf, param_buf = self._buffers[(c.device, self._step_dtype(c))]
        # the gradient buffer holds another chunk's values: zero the gaps between tensors (stale values there
        # would raise a block's absmax) and the tensors without a gradient; the rest is overwritten
        zero = c.gap_views + [v for v, ok in zip(c.grad_views, present) if not ok]
        if zero:
            torch._foreach_zero_(zero)
        if all(present):
            torch._foreach_copy_(c.grad_views, grads)
        else:
            torch._foreach_copy_([v for v, ok in zip(c.grad_views, present) if ok],
                                 [x for x in grads if x is not None])
        torch._foreach_copy_(c.param_views, [params[i] for i in c.indices])
        self._kernel(c, state, grad_buf[:c.length], param_buf[:c.length], lr, beta1, beta2, eps, wd)
        if self._rounds(c):   # the copies back into the bf16 weights are then exact
            round_to_bf16_(param_buf[:c.length], step_seed(state["step"], c.indices[0]))
        if all(present):
            torch._foreach_copy_([params[i] for i in c.indices], c.param_views)
        else:
            torch._foreach_copy_([params[i] for i, ok in zip(c.indices, present) if ok],
                                 [v for v, ok in zip(c.param_views, present) if ok])

    # --- stepping inside the backward pass (train.json fused_backward_pass) ---

    def step_in_backward(self, overlap: bool = False) -> None:
        """From now on, step each chunk as soon as the backward pass has accumulated the gradients of all its
        parameters, and free those gradients at once: the gradients of the whole model never exist together
        (a full fp32 copy of the model less). The result equals step() after the backward pass, because each
        chunk's update reads only its own gradients. The caller must call step() after each backward pass (it
        steps the chunks where some parameter got no gradient) and must not accumulate gradients over several
        backward passes, clip them or unscale them (a GradScaler's fp16 scale would reach the update).

        overlap (CUDA): the chunks step on a second stream, so their memory-bound updates run alongside the rest
        of the backward pass instead of after it; step() makes the current stream wait for them. A chunk steps
        once the backward pass has produced all its gradients, and by then it no longer reads those weights."""
        if self._arrived is not None:
            return
        if self._chunks is None:
            self._build()
        params = self.param_groups[0]["params"]
        if overlap:
            devices = {p.device for p in params}
            if len(devices) != 1 or next(iter(devices)).type != "cuda":
                raise ValueError(f"overlap needs all parameters on one CUDA device, got {sorted(map(str, devices))}")
            self._stream = torch.cuda.Stream(next(iter(devices)))
        self._arrived = [set() for _ in self._chunks]
        for n, c in enumerate(self._chunks):
            for i in c.indices:
                if params[i].requires_grad:
                    params[i].register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, n, i))

    @torch.no_grad()
    def _gradient_ready(self, n: int, index: int, _param: torch.Tensor) -> None:
        c = self._chunks[n]
        if len(self._arrived[n]) == len(c.indices):
            # a second gradient for a tensor whose chunk is already stepped (re-entrant checkpointing of a weight
            # used in two places): stepping again would apply that weight's update twice
            raise RuntimeError(f"fused_backward_pass: parameter {index} got a second gradient in one backward pass "
                               f"after its optimizer step; this model needs fused_backward_pass false")
        self._arrived[n].add(index)   # a set: a repeated gradient before the chunk is complete counts once
        if len(self._arrived[n]) != len(c.indices):   # a chunk with a frozen parameter waits for step()
            return
        params = self.param_groups[0]["params"]
        if self._stream is None:
            self._step_chunk(c)
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))   # its gradients are ready
            with torch.cuda.stream(self._stream):
                self._step_chunk(c)
            for i in c.indices:   # the allocator must not hand this memory to the backward pass before the step read it
                params[i].grad.record_stream(self._stream)
        for i in c.indices:
            params[i].grad = None

    def _launch_triton(self, items: list[tuple[Chunk, dict, list[torch.Tensor]]]) -> None:
        """Step chunks with the Triton kernel: one launch per step count, dtype and device (normally one). The
        state holds each tensor in its logical (row-major) order, as the copying path does, so a weight or gradient
        in another memory layout (channels_last convolutions) is stepped through a contiguous copy."""
        if not items:
            return
        groups: dict[tuple, list] = {}
        for item in items:
            c, state, _ = item
            groups.setdefault((state["step"], c.dtype, c.device), []).append(item)
        group = self.param_groups[0]
        params = group["params"]
        position = {id(c): n for n, c in enumerate(self._chunks)}
        for (step, dtype, device), chunks in groups.items():
            key = tuple(position[id(c)] for c, _, _ in chunks)
            rows = self._triton_rows.get(key)
            if rows is None:
                parts, slot = [], 0
                for k, (c, _, _) in enumerate(chunks):
                    parts.append(triton8bit.segment_rows([params[i].numel() for i in c.indices], c.offsets,
                                                         c.length, tensor_slot=slot, chunk_slot=k,
                                                         segment=self.triton_tuning["segment"]))
                    slot += len(c.indices)
                rows = self._triton_rows[key] = torch.cat(parts).to(device)
            if device not in self._triton_maps:
                self._triton_maps[device] = triton8bit.kernel_maps(*self._qmap(device))
            beta1, beta2 = (float(b) for b in group["betas"])
            weights = [params[i] for c, _, _ in chunks for i in c.indices]
            stepped = [w if w.is_contiguous() else w.contiguous() for w in weights]
            rounds = self.stochastic_rounding and dtype == torch.bfloat16
            triton8bit.adamw8bit_step(
                rows, stepped, [g.contiguous() for _, _, gs in chunks for g in gs],
                [(s["state1"], s["state2"], s["absmax1"], s["absmax2"]) for _, s, _ in chunks],
                self._triton_maps[device], step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                rounding_seed=step_seed(step, chunks[0][0].indices[0]) if rounds else None, **self.triton_tuning)
            copied = [(w, t) for w, t in zip(weights, stepped) if t is not w]
            if copied:
                torch._foreach_copy_([w for w, _ in copied], [t for _, t in copied])

    def take_grad_norm(self) -> torch.Tensor | None:
        """The L2 norm of the gradients stepped since the last call (with record_grad_norm on), as a device
        tensor; with backward steps the gradients are gone by the time a caller could measure them."""
        squared, self._grad_sq = self._grad_sq, None
        return None if squared is None else squared.sqrt()

    def _step_in_place(self, c: Chunk, state: dict, param: torch.Tensor, grad: torch.Tensor, *hyper) -> None:
        """A large tensor alone in its chunk: bitsandbytes' own per-tensor call, no copies (a copy only when the
        parameter or its gradient is not contiguous, or of another dtype; an fp32 copy for stochastic rounding)."""
        dtype = self._step_dtype(c)
        if param.is_contiguous() and grad.is_contiguous() and grad.dtype == param.dtype == dtype:
            self._kernel(c, state, grad.view(-1), param.view(-1), *hyper)
        else:
            flat = param.detach().to(dtype, memory_format=torch.contiguous_format, copy=True).view(-1)
            self._kernel(c, state, grad.to(dtype).contiguous().view(-1), flat, *hyper)
            if self._rounds(c):
                round_to_bf16_(flat, step_seed(state["step"], c.indices[0]))
            param.copy_(flat.view_as(param))

    def _kernel(self, c: Chunk, state: dict, g: torch.Tensor, p: torch.Tensor, lr: float, beta1: float,
                beta2: float, eps: float, wd: float) -> None:
        """The call bitsandbytes' Optimizer2State / Optimizer1State.update_step makes, on a chunk."""
        step, adam = state["step"], self.kind == "adam"
        if c.eight_bit:
            qmap1, qmap2 = self._qmap(c.device)
            F.optimizer_update_8bit_blockwise(
                self.kind, g, p, state["state1"], state["state2"] if adam else None, beta1, beta2, 0.0, 0.0, eps,
                step, lr, qmap1, qmap2 if adam else None, state["absmax1"], state["absmax2"] if adam else None,
                wd, gnorm_scale=1.0, skip_zeros=False)
        else:
            F.optimizer_update_32bit(
                self.kind, g, p, state["state1"], beta1, eps, step, lr, state["state2"] if adam else None, beta2,
                0.0, 0.0, wd, 1.0, None, max_unorm=0.0, skip_zeros=False)

    # --- state dict ---

    def _check_state(self, state: dict, c: Chunk, index: int) -> None:
        """A chunk's state must be this layout's: same parameters, sizes and kind of state."""
        expected = self._new_state_shapes(c)
        problem = None
        if state.get("params") != list(c.indices):
            problem = "a different set or order of parameters"
        else:
            for name, (numel, dtype) in expected.items():
                t = state.get(name)
                if not isinstance(t, torch.Tensor) or t.numel() != numel or t.dtype != dtype:
                    problem = f"a different '{name}' ({'missing' if t is None else tuple(t.shape)})"
                    break
            extra = sorted(k for k in state if k.startswith(("state", "absmax")) and k not in expected)
            if problem is None and extra:
                problem = f"state {', '.join(extra)} this optimizer does not have (another optimizer?)"
        if problem:
            raise ConfigError(f"{type(self).__name__}: the optimizer state for parameter {index} does not fit this "
                              f"model's parameters ({problem}); resume with the same trained parameters, "
                              f"or start from a checkpoint without optimizer state")

    def _new_state_shapes(self, c: Chunk) -> dict[str, tuple[int, torch.dtype]]:
        names = ("state1", "state2") if self.kind == "adam" else ("state1",)
        shapes = {}
        for i, name in enumerate(names):
            shapes[name] = (c.length, torch.uint8 if c.eight_bit else torch.float32)
            if c.eight_bit:
                shapes[f"absmax{i + 1}"] = (math.ceil(c.length / BLOCK_SIZE), torch.float32)
        return shapes

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("state", {})
        if any(not isinstance(v, dict) or STATE_MARKER not in v for v in saved.values()):
            raise ConfigError(layout_mismatch_message(saved_grouped=False, kind=self.kind))
        chunks = {c.indices[0]: c for c in self._plan()}
        for index, value in saved.items():
            if index not in chunks:
                raise ConfigError(f"{type(self).__name__}: the checkpoint's optimizer state does not fit this "
                                  f"model's parameters (state for parameter {index}, which starts no chunk here); "
                                  f"resume with the same trained parameters, or start from a checkpoint without "
                                  f"optimizer state")
            self._check_state(value, chunks[index], index)
        # torch's loader would cast every state tensor to its parameter's dtype (uint8 state to fp32: 4x the
        # memory for a moment, and fp16 absmax with fp16 parameters); it gets the rest, the tensors come here
        tensors = {index: {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
                   for index, value in saved.items()}
        rest = {index: {k: v for k, v in value.items() if not isinstance(v, torch.Tensor)}
                for index, value in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        params = self.param_groups[0]["params"]
        for index, values in tensors.items():
            device = params[index].device
            self.state[params[index]].update({k: v.to(device=device, copy=True) for k, v in values.items()})


class GroupedAdamW8bit(Grouped8bit):
    """bitsandbytes' AdamW8bit, stepped in chunks (Grouped8bit with kind "adam"); triton: with our Triton kernel
    (optimizer/triton8bit.py) instead of bitsandbytes' CUDA kernel."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, direct_elements: int = DEFAULT_DIRECT_ELEMENTS,
                 triton: bool = False, stochastic_rounding: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, kind="adam", chunk_elements=chunk_elements,
                         direct_elements=direct_elements, triton=triton, stochastic_rounding=stochastic_rounding)


class GroupedLion8bit(Grouped8bit):
    """bitsandbytes' Lion8bit, stepped in chunks (Grouped8bit with kind "lion")."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, direct_elements: int = DEFAULT_DIRECT_ELEMENTS,
                 stochastic_rounding: bool = False):
        super().__init__(params, lr, betas, 0.0, weight_decay, kind="lion", chunk_elements=chunk_elements,
                         direct_elements=direct_elements, stochastic_rounding=stochastic_rounding)


def layout_mismatch_message(*, saved_grouped: bool, kind: str) -> str:
    """The checkpoint's optimizer state was saved with the other setting of optimizer.json's grouped_8bit_step."""
    name = KINDS[kind]
    saved, now = ("true", "false") if saved_grouped else ("false", "true")
    layouts = {"true": f"grouped {name}, state in chunks", "false": f"bitsandbytes' {name}, state per tensor"}
    return (f"the checkpoint's optimizer state was saved with grouped_8bit_step {saved} ({layouts[saved]}); this "
            f"run has grouped_8bit_step {now} ({layouts[now]}) and cannot load it. To resume the checkpoint, set "
            f"\"grouped_8bit_step\": {saved} in optimizer.json. To switch, resume it with grouped_8bit_step {saved} "
            f"and save_optimizer false in train.json: the checkpoints saved then hold no optimizer state, and "
            f"resuming one of them with grouped_8bit_step {now} starts the optimizer fresh.")


class _RejectGroupedState:
    """Mixin for bitsandbytes' per-tensor classes: a grouped state would load without error and then silently
    restart every tensor's state but each chunk's first (on CUDA); refuse it with the fix instead."""
    _kind = "adam"

    def load_state_dict(self, state_dict, *args, **kwargs):
        if any(isinstance(v, dict) and STATE_MARKER in v for v in state_dict.get("state", {}).values()):
            raise ConfigError(layout_mismatch_message(saved_grouped=True, kind=self._kind))
        return super().load_state_dict(state_dict, *args, **kwargs)


class AdamW8bit(_RejectGroupedState, bnb.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit, unchanged except that it refuses a Grouped8bit state (grouped_8bit_step false)."""
    _kind = "adam"


class Lion8bit(_RejectGroupedState, bnb.optim.Lion8bit):
    """bitsandbytes' Lion8bit, unchanged except that it refuses a Grouped8bit state (grouped_8bit_step false)."""
    _kind = "lion"
