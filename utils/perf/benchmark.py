"""Measure the trainer's own step and data pipeline on a full-size SD architecture with random weights.

    python -m utils.benchmark --arch sd15 --resolution 512 --batch_size 6 --steps 30 [--max_vram_gb 22] [--key value ...]

Builds the SD1.5 or SD2.1 architecture (configs shipped, nothing downloaded), writes synthetic JPEGs to a
temporary data_root, and runs the same preflight, setup and loop that train.py runs. After the warm-up steps it reports images/s
(end to end, data loading included), step time, peak allocated / reserved GPU memory, the FLOPs of one training
image (counted from the model configs) with the achieved TFLOP/s and model FLOP utilisation (MFU), setup and
compile time, and how much GPU and host memory grew from the end of the warm-up to the last step. Any other
train.json key can be passed through as --key value (e.g. --mixed_precision fp16 --cache_latents true).
--log_every N logs the loss every N steps (metrics.jsonl of the run; --loss_trace FILE copies it as JSON lines).

--profile N runs N more optimizer steps after the timed ones under torch.profiler and prints, before the JSON
line (always the last line printed), the device time per step by kernel category (attention, conv, gemm, norm,
optimizer, ...; see kernel_category) and the 15 kernels with the most device time (ms and calls per step); the
JSON gets "profile": {category: ms per step}. The time is each kernel's own (self) time, so nothing counts twice.
Without CUDA it reports the ops' CPU self time instead. The profiled steps come after the timed window, so one
run (one compile) gives both the speed and the profile. While profiling, the log step becomes gcd(log step,
warmup, steps, N), so that both windows start and end on a log step (with --loss_trace, the trace then has more
rows). Keep N small (3-5): an SD step launches thousands of kernels, and the profiler's trace and its summary
grow with them.

On CUDA the timed steps run under torch.cuda.set_sync_debug_mode("warn"): every operation that makes the host
wait for the GPU is counted by the line of code that called it ("host_syncs": {file:line: count}). A step should
have none, and neither should a logging step (the trainer reads the loss a step later). The benchmark itself
waits for the GPU only where the timed and profiled windows start and end. "log_window_step_ms" gives the
host's ms a step between the log steps inside the timed window (a long one in the middle is where the host
stopped), "gc_ms" the garbage collector's pauses there by generation.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from utils.perf.profile_report import (idle_by_phase, print_idle, print_profile, profile_rows, summarize_profile,
                                       timeline)


def write_synthetic_images(folder: Path, count: int, sizes: list[tuple[int, int]]) -> None:
    """Smooth random images saved as JPEG, so decoding costs what real photos cost; image i has size
    sizes[i % len(sizes)] (several sizes: several aspect-ratio buckets)."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 255, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(folder / f"synthetic image {i}_{i}.jpg", quality=90)


def synthetic_data_folder(work: Path, count: int, sizes: list[tuple[int, int]]) -> Path:
    """The synthetic images of one count and set of sizes in a --workdir, written once (to a temporary folder,
    then renamed, so an interrupted write is never reused). A folder per count and sizes: a run with --images 480
    must not train on the 960 images an earlier run left in the same workdir (its losses would not be
    comparable)."""
    data = work / ("data-" + "-".join([str(count)] + [f"{w}x{h}" for w, h in sizes]))
    if not data.exists():
        tmp = data.with_name(data.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_images(tmp, count, sizes)
        tmp.rename(data)
    return data


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sd21", "sdxl", "tiny-sd", "tiny-sdxl"], default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    ap.add_argument("--max_vram_gb", type=float, default=None, help="cap this process's GPU memory")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default: enough for the steps)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data_only", action="store_true",
                    help="time the data pipeline alone (decode, crop, resize, collate) with --num_workers workers")
    ap.add_argument("--num_workers", type=int, default=None)
    ap.add_argument("--image_size", type=int, nargs=2, action="append", default=None, metavar=("W", "H"),
                    help="synthetic JPEG size (default: resolution x resolution); repeat it for several sizes, "
                         "the images taking them in turn (several aspect-ratio buckets)")
    ap.add_argument("--log_every", type=int, default=None, help="log (and trace memory) every N steps")
    ap.add_argument("--loss_trace", default=None, help="write the logged losses here as JSON lines")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU "
                    "(default: from the device name, see utils/perf/flops.py)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N steps after the warm-up: device time by kernel category, top kernels")
    args, passthrough = ap.parse_known_args(argv)

    # as the trainer does, but here before the first CUDA call (the memory cap below)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    if args.max_vram_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_vram_gb * 2**30 / total))

    from utils.run.config import load_config
    from utils.run.loop import cleanup, train
    from utils.run.preflight import preflight
    from utils.run.setup import setup

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdbench-"))
    n_images = args.images or args.batch_size * (args.steps + args.warmup)
    log_every = args.log_every or args.warmup
    if args.profile:  # the timed and the profiled window must start and end on a log step (the hook)
        log_every = math.gcd(log_every, args.warmup, args.steps, args.profile)
    sizes = [tuple(size) for size in args.image_size or [(args.resolution, args.resolution)]]
    data = synthetic_data_folder(work, n_images, sizes)
    if args.data_only:
        return _time_data_pipeline(data, args)
    timed_end = args.warmup + args.steps
    total_steps = timed_end + args.profile
    argv_cfg = ["--resume_ckpt", f"builtin:{args.arch}", "--data_root", str(data), "--logdir", str(work / "logs"),
                "--project_name", "bench", "--resolution", str(args.resolution), "--batch_size",
                str(args.batch_size), "--max_steps", str(total_steps), "--max_epochs", "1000",
                "--log_step", str(log_every), "--sample_steps", "1000000", "--cond_dropout", "0",
                "--no_save_ckpt", "--ckpt_every_n_minutes", "100000", "--latent_cache_dir", str(work / "latents"),
                *(["--num_workers", str(args.num_workers)] if args.num_workers is not None else []), *passthrough]
    cfg, _ = load_config(argv_cfg)
    trainer = preflight(cfg)  # the Run: the same steps train.py takes
    cuda = torch.cuda.is_available()
    prof = {}  # --profile: the profiler ("p") and the log steps where it started and stopped
    sync_watch, sync_records = contextlib.ExitStack(), []  # CUDA: set_sync_debug_mode's warnings, timed steps
    try:
        t_setup = time.perf_counter()
        setup(trainer)
        setup_s = time.perf_counter() - t_setup
        timings, memory, warmup_peak = {}, {}, {}

        def on_log(step: int) -> None:  # called at each log step; steps warmup..warmup+steps are timed, then profiled
            nonlocal sync_records
            # only where a window starts or ends: a wait at the log steps between would leave the GPU idle while
            # the host queues the next step, which a run at the trainer's log_step (25) does not have
            ends_window = step in (args.warmup, timed_end) or ("start" in prof and "stop" not in prof
                                                               and step >= prof["start"] + args.profile)
            if cuda and ends_window:
                torch.cuda.synchronize()
            timings[step] = time.perf_counter()
            memory[step] = (torch.cuda.memory_allocated() if cuda else 0, torch.cuda.memory_reserved() if cuda else 0,
                            _host_rss())
            if step == args.warmup and cuda:
                # CUDA graphs take their memory when they record (in the warm-up) and replays allocate nothing,
                # so the timed steps' peak misses it: keep the warm-up's peak as well
                warmup_peak["allocated"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                sync_records = sync_watch.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                sync_watch.callback(torch.cuda.set_sync_debug_mode, 0)
            if step == args.warmup:
                gc.callbacks.append(gc_watch)
                sync_watch.callback(gc.callbacks.remove, gc_watch)
            if step == timed_end:
                sync_watch.close()
            if args.profile and "start" not in prof and step >= timed_end:
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                prof["p"] = torch.profiler.profile(activities=activities, record_shapes=False)
                prof["p"].start()
                prof["start"] = step
            elif "start" in prof and "stop" not in prof and step >= prof["start"] + args.profile:
                prof["p"].stop()  # the GPU was synchronized above: every kernel of these steps has run
                prof["stop"] = step

        gc_pauses, gc_started = [], {}

        def gc_watch(phase: str, info: dict) -> None:  # the timed steps' garbage collections: the host stops
            if phase == "start":
                gc_started["t"] = time.perf_counter()
            elif "t" in gc_started:
                gc_pauses.append((info["generation"], time.perf_counter() - gc_started.pop("t")))

        trainer.log_hook = on_log
        code = train(trainer, final_outputs=False)
    except torch.OutOfMemoryError:  # in setup; the loop catches its own and returns 1
        trainer.out_of_memory, code = True, 1
    finally:
        sync_watch.close()  # the run ended early (otherwise closed already)
        if "start" in prof and "stop" not in prof:  # the run ended early
            prof["p"].stop()
            prof["stop"] = max(timings, default=prof["start"])
        cleanup(trainer)
    if code != 0:
        result = {"arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
                  "oom": trainer.out_of_memory, "rc": code, "options": " ".join(passthrough)}
        if cuda:  # how far it got: the peak before the failed allocation (since the warm-up, if reached)
            result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(result), flush=True)
        return result
    # time from the log step that ends the warm-up to the one that ends the timed window
    marks = sorted(m for m in timings if args.warmup <= m <= timed_end)
    t_steps = marks[-1] - marks[0]
    dt = (timings[marks[-1]] - timings[marks[0]]) / t_steps
    images_per_s = args.batch_size / dt
    # host time per step between the log steps inside the window (only the ends wait for the GPU, so a long one
    # is where the host stopped); garbage collections in the window, by generation
    windows = [round((timings[b] - timings[a]) / (b - a) * 1e3, 1) for a, b in zip(marks, marks[1:])]
    gc_ms = {f"gen{g}": round(sum(t for gen, t in gc_pauses if gen == g) * 1e3, 1)
             for g in sorted({g for g, _ in gc_pauses})}
    result = {"arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
              "timed_steps": t_steps, "step_ms": round(dt * 1e3, 1), "images_per_s": round(images_per_s, 2),
              "log_window_step_ms": windows, "gc_ms": gc_ms, "gc_collections": len(gc_pauses),
              "setup_s": round(setup_s, 1), "compile_s": trainer.compile_seconds and round(trainer.compile_seconds, 1),
              "options": " ".join(passthrough)}
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        result["warmup_peak_allocated_gib"] = round(warmup_peak.get("allocated", 0) / 2**30, 2)
        result["host_syncs"] = sync_sites(sync_records)
        # the allocator freed its cache and retried an allocation (a sync each time): the cap is too tight
        result["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    result.update(_flop_figures(trainer, images_per_s, args.peak_tflops, work))
    result.update(_memory_growth(memory, marks))
    if args.loss_trace:
        _write_loss_trace(trainer.run_dir / "metrics.jsonl", Path(args.loss_trace))
    if prof.get("stop", 0) > prof.get("start", 0):
        steps = prof["stop"] - prof["start"]
        by_category, top = summarize_profile(profile_rows(prof["p"], cuda), steps)
        print_profile(by_category, top, steps, "GPU" if cuda else "CPU")
        result["profile"] = by_category
        if trace := timeline(prof["p"]):
            idle = idle_by_phase(*trace, steps=steps)
            result["profile_host_ms"] = idle.pop("host_ms")
            if cuda:
                result["profile_idle"] = idle
            print_idle(idle if cuda else None, result["profile_host_ms"])
    print(json.dumps(result), flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def sync_sites(records: list) -> dict[str, int]:
    """{"file:line": count} of set_sync_debug_mode's warnings (each names the Python line that made the host
    wait), most frequent first; other warnings are left out."""
    counts: dict[str, int] = {}
    for w in records:
        if "synchronizing" in str(w.message):
            site = f"{Path(w.filename).name}:{w.lineno}"
            counts[site] = counts.get(site, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _host_rss() -> int:
    """Resident memory of this process in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _memory_growth(memory: dict, marks: list[int]) -> dict:
    """GPU allocated / reserved and host RSS at the end of the warm-up and at the last step (MiB), and the growth."""
    if len(marks) < 2:
        return {}
    first, last = memory[marks[0]], memory[marks[-1]]
    out = {}
    for i, name in enumerate(("gpu_allocated", "gpu_reserved", "host_rss")):
        out[f"{name}_mib"] = [round(first[i] / 2**20), round(last[i] / 2**20)]
        out[f"{name}_growth_mib"] = round((last[i] - first[i]) / 2**20, 1)
    return out


def _flop_figures(trainer, images_per_s: float, peak: float | None, work: Path) -> dict:
    """GFLOP per image (from the configs; the VAE encode counts unless latents are cached), TFLOP/s and MFU."""
    import torch
    from utils.perf.flops import peak_tflops, training_flops_per_image
    sd, cfg, trained = trainer.models.sd, trainer.cfg, list(trainer.models.train_text_encoders)
    size = trainer.resolutions[0]  # the benchmark's square images train at the base resolution
    known = work / "flops.json"    # counting SD-sized models takes seconds: once per workdir and setting
    configs = [dict(sd.unet.config), *(te.config.to_dict() for te in sd.text_encoders)]
    key = hashlib.sha1(json.dumps([configs, size, cfg.cache_latents, trained], sort_keys=True,
                                  default=str).encode()).hexdigest()
    table = json.loads(known.read_text()) if known.exists() else {}
    if key not in table:
        table[key] = training_flops_per_image(
            sd.family, dict(sd.unet.config), [te.config for te in sd.text_encoders],
            None if cfg.cache_latents else dict(sd.vae.config), width=size, height=size, train_text_encoders=trained)
        known.write_text(json.dumps(table))
    flops = table[key]
    tflops = flops * images_per_s / 1e12
    out = {"gflop_per_image": round(flops / 1e9, 3), "tflops": round(tflops, 2)}
    if torch.cuda.is_available():
        peak = peak or peak_tflops(torch.cuda.get_device_name(0))
        if peak:
            out["mfu"] = round(tflops / peak, 3)
    return out


def _write_loss_trace(metrics: Path, out: Path) -> None:
    with open(metrics) as f, open(out, "w") as w:
        for line in f:
            row = json.loads(line)
            if "loss/log_step" in row:
                w.write(json.dumps({"step": row["step"], "loss": row["loss/log_step"]}) + "\n")


def loss_agreement(reference: list[dict], candidate: list[dict], steps: int, tolerance: float = 0.02) -> dict:
    """Compare two runs' per-step losses over their first `steps` steps (same data, seeds and noise, so the
    difference is numerics): relative difference of the mean loss overall and over the last quarter, and the
    median per-step relative difference. ok when both means agree within `tolerance`."""
    ref = {row["step"]: row["loss"] for row in reference if row["step"] <= steps}
    cand = {row["step"]: row["loss"] for row in candidate if row["step"] <= steps}
    common = sorted(ref.keys() & cand.keys())
    if not common:
        raise ValueError("the two traces share no step")
    late = common[len(common) * 3 // 4:]

    def rel(keys):
        a, b = sum(ref[k] for k in keys) / len(keys), sum(cand[k] for k in keys) / len(keys)
        return a, b, abs(b - a) / abs(a)
    per_step = sorted(abs(cand[k] - ref[k]) / abs(ref[k]) for k in common)
    mean_ref, mean_cand, d_all = rel(common)
    late_ref, late_cand, d_late = rel(late)
    return {"steps": len(common), "mean_loss": [round(mean_ref, 5), round(mean_cand, 5)],
            "mean_rel_diff": round(d_all, 4), "last_quarter_loss": [round(late_ref, 5), round(late_cand, 5)],
            "last_quarter_rel_diff": round(d_late, 4), "median_step_rel_diff": round(per_step[len(per_step) // 2], 4),
            "tolerance": tolerance, "ok": d_all <= tolerance and d_late <= tolerance}


def _time_data_pipeline(data: Path, args) -> dict:
    """Images/s of scan -> batch plans -> BatchDataset -> DataLoader, the path the trainer uses, no model."""
    import torch
    from data.dataset import BatchDataset, DataSettings, epoch_batches, scan_dataset
    scan = scan_dataset(data, DataSettings(resolution=[args.resolution]))
    plans = epoch_batches(scan.items, batch_size=args.batch_size, seed=1, epoch=0, resolutions=[args.resolution])
    from utils.run.loader import default_workers, make_loader
    workers = default_workers(args.num_workers)
    loader = make_loader(BatchDataset(scan.items, plans, seed=1, epoch=0), num_workers=workers,
                         pin_memory=torch.cuda.is_available())
    warm = min(len(plans) // 4, 4 * max(1, workers))
    images, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == warm:
            t0, images = time.perf_counter(), 0
        images += len(batch["captions"])
    dt = time.perf_counter() - t0
    result = {"data_only": True, "resolution": args.resolution, "image_size": args.image_size,
              "num_workers": workers, "images": images, "images_per_s": round(images / dt, 1)}
    print(json.dumps(result), flush=True)
    return result


def compare_main(argv: list[str]) -> int:
    """python -m utils.benchmark compare REFERENCE.jsonl CANDIDATE.jsonl STEPS: the loss traces of two runs."""
    ref, cand, steps = argv

    def read(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    result = loss_agreement(read(ref), read(cand), int(steps))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m utils.benchmark [compare] ...`: one measurement, or a comparison of two saved ones."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
