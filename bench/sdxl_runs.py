"""SDXL on one GPU beside the plain diffusers step (doc/SDXL.md, doc/PERFORMANCE.md).

    python bench/sdxl_runs.py [ROW ...]       # default: every row, in the order below; a table at the end

Rows: the reference step (`.bench_ref/sdxl_reference.py`, a copy of ../shared/bench/sdxl_reference.py) as kohya's
24 GB recipe (UNet alone, batch 1, capped at 22 GiB), with both encoders trained and bf16 weights rounded to
nearest (kohya's --full_bf16, uncapped), and with fp32 weights capped at 22 GiB; our benchmark
(`python -m utils.benchmark --arch sdxl`, builtin:sdxl: SDXL 1.0 base's architecture, random weights) with the
preset examples/train_sdxl_24gb.json (UNet and both encoders, bf16 weights rounded stochastically) capped at
22 GiB, with our Triton 8-bit kernel, and the UNet alone capped at 16 GiB; and `whole`: a whole train.py run of
the preset on 24 images in three buckets (896x1152, 1024x1024, 1152x896), a sample each epoch, a save at the end.
Needs diffusers and bitsandbytes (carried as wheels); WORK (default /tmp/sdxl_runs) holds the built model (13.6 GB).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("WORK", "/tmp/sdxl_runs"))
REFERENCE = ROOT / ".bench_ref" / "sdxl_reference.py"
PRESET = ["--config", "examples/train_sdxl_24gb.json"]
BENCH = [sys.executable, "-m", "utils.perf.benchmark", "--arch", "sdxl", "--resolution", "1024", "--steps", "8",
         "--warmup", "3", "--log_every", "1"]
ROWS = {  # name: (what it is, command)
    "ref_kohya": ("reference: UNet alone, batch 1, fp32 weights, cap 22 GiB",
                  [sys.executable, str(REFERENCE), "--batch", "1", "--cached", "--grad-ckpt", "--train-te", "0",
                   "--mem-cap-gb", "22"]),
    "ref_full_bf16": ("reference: UNet + both TEs, batch 4, bf16 weights (nearest), uncapped",
                      [sys.executable, str(REFERENCE), "--batch", "4", "--cached", "--grad-ckpt", "--train-te", "1",
                       "--bf16-weights"]),
    "ref_full_cap": ("reference: UNet + both TEs, batch 4, fp32 weights, cap 22 GiB",
                     [sys.executable, str(REFERENCE), "--batch", "4", "--cached", "--grad-ckpt", "--train-te", "1",
                      "--mem-cap-gb", "22"]),
    "ours_full": ("ours: preset, UNet + both TEs, batch 4, bf16 weights (stochastic), cap 22 GiB",
                  [*BENCH, *PRESET, "--batch_size", "4", "--max_vram_gb", "22"]),
    "ours_full_triton": ("ours: the same with our Triton 8-bit kernel",
                         [*BENCH, *PRESET, "--batch_size", "4", "--max_vram_gb", "22",
                          "--optimizer_config", "examples/optimizer_24gb_fast.json"]),
    "ours_unet_16": ("ours: UNet alone, batch 4, bf16 weights, TEs frozen and cached, cap 16 GiB",
                     [*BENCH, *PRESET, "--batch_size", "4", "--max_vram_gb", "16",
                      "--disable_textenc_training", "true"]),
}
SIZES = [(896, 1152), (1024, 1024), (1152, 896)]
CAPPED = ("import os, sys, torch; os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True'); "
          "torch.cuda.set_per_process_memory_fraction(22 * 2**30 / torch.cuda.get_device_properties(0).total_memory);"
          " sys.path.insert(0, '.'); import train; sys.exit(train.main(sys.argv[1:]))")


def json_line(text: str) -> dict | None:
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), None)
    return json.loads(line) if line else None


def bench_row(name: str) -> dict:
    what, cmd = ROWS[name]
    if "utils.perf.benchmark" in cmd:
        cmd = [*cmd, "--workdir", str(WORK / "bench")]   # one workdir: builtin:sdxl is built once
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    result = {"row": name, "what": what, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    result.update(json_line(proc.stdout) or {"error": (proc.stderr or proc.stdout)[-1500:]})
    return result


def whole_run() -> dict:
    from PIL import Image, ImageDraw
    data = WORK / "data"
    if not data.exists():
        data.mkdir(parents=True)
        colours = ["red", "green", "blue", "yellow"]
        for i in range(24):
            w, h = SIZES[i % 3]
            img = Image.new("RGB", (w, h), (30 + 9 * i, 60, 200 - 5 * i))
            ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(220, 40 + 7 * i, 40))
            img.save(data / f"a {colours[i % 4]} circle on a plain background_{i}.jpg", quality=92)
    prompts = WORK / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    logdir = WORK / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    model = next((WORK / "bench").rglob("builtin/sdxl"), None)
    args = [*PRESET, "--resume_ckpt", str(model) if model else "builtin:sdxl", "--data_root", str(data),
            "--logdir", str(logdir), "--max_epochs", "2", "--sample_prompts", str(prompts), "--sample_steps", "6",
            "--save_every_n_epochs", "2", "--log_step", "2", "--latent_cache_dir", str(WORK / "latents")]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CAPPED, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    run_dir = next((p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith(".")), None) \
        if logdir.exists() else None
    text = (run_dir / f"{run_dir.name}.log").read_text() if run_dir else proc.stderr
    result = {"row": "whole", "what": "train.py, preset, 3 buckets, samples, a save", "rc": proc.returncode,
              "wall_s": round(wall, 1)}
    if done := re.search(r"done: (\d+) steps, \d+ epochs, (\d+) images in [\d.]+ min \(([\d.]+) images/s", text):
        result.update(steps=int(done[1]), images=int(done[2]), images_per_s=float(done[3]))
    if run_dir:
        result["samples"] = len(list((run_dir / "samples").glob("*.jpg")))
        result["saved"] = text.count("saved ")
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        windows = [r["performance/images per second"] for r in rows if "performance/images per second" in r]
        # the median of the logged windows after the first (which holds the first step's setup)
        result["steady_images_per_s"] = round(statistics.median(windows[1:]), 2) if windows[1:] else None
        result["peak_gib"] = max((r.get("performance/vram", 0) for r in rows), default=None)
        shutil.copy(run_dir / f"{run_dir.name}.log", WORK / "whole.log")
    if proc.returncode:
        result["error"] = (proc.stderr or text)[-1500:]
    return result


def main(names: list[str]) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names or [*ROWS, "whole"]:
        results.append(whole_run() if name == "whole" else bench_row(name))
        print(json.dumps(results[-1]), flush=True)   # each as it ends: a command cut short keeps them
    (Path(os.environ.get("OUT", WORK)) / "sdxl_runs.json").write_text(json.dumps(results, indent=1))
    print("\n| row | what | images/s | peak GiB | rc |\n|---|---|---|---|---|")
    for r in results:
        peak = r.get("peak_allocated_gib", r.get("peak_gib"))   # ours, or the reference's and the whole run's
        speed = "OOM" if r.get("oom") else r.get("images_per_s")
        print(f"| {r['row']} | {r['what']} | {speed} | {peak} | {r['rc']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
