"""Whole `train.py` runs as a user makes them, beside the reference step, on one GPU (doc/PERFORMANCE.md).

    python bench/whole_runs.py data                  # the dataset: 336 JPEGs in three buckets, with captions
    python bench/whole_runs.py prewarm PRESET ...    # compile each preset's bucket shapes side by side (caches)
    python bench/whole_runs.py run PRESET ...        # reference step, then each preset's whole run; a table

PRESET is default (train.json), fast (examples/train_24gb_fast.json), graphs (fast with batch 15 and CUDA graphs)
or 12gb (examples/train_12gb.json); NAME_tiny (fast_tiny, graphs_tiny, 12gb_tiny) runs a preset's options on
builtin:tiny-sd, to see every bucket shape compile, sample and save in seconds. NOREF=1 skips the reference step.
Each run trains builtin:sd15 (random weights, SD1.5's architecture) for EPOCHS (default 3) epochs on 384x640,
512x512 and 640x384 images, with samples and a save each epoch, capped at 22 GiB (10.5 GiB for 12gb).
Reported: the process's wall time (model build included), images/s over it and over the trainer's own
run, the steady-state images/s (median of the logged windows after the last compile), the compile seconds per
batch shape, the peak GPU memory. Needs diffusers and bitsandbytes (carried as wheels) and WORK (default
/tmp/whole_runs) with room for a few checkpoints; runs' checkpoints are deleted once read.
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
WORK = Path(os.environ.get("WORK", "/tmp/whole_runs"))
DATA = WORK / "data"
SIZES = [(384, 640), (512, 512), (640, 384)]
PER_SIZE = 112
COLOURS = {"red": (210, 40, 40), "green": (40, 180, 70), "blue": (40, 70, 210), "yellow": (230, 210, 50),
           "white": (240, 240, 240), "black": (20, 20, 20), "purple": (140, 60, 170), "orange": (240, 140, 30)}
PRESETS = {  # name: (train.json, extra overrides, GiB cap)
    "default": ("train.json", [], 22.0),
    "fast": ("examples/train_24gb_fast.json", [], 22.0),
    "graphs": ("examples/train_24gb_fast.json", ["--batch_size", "15", "--compile_mode", "reduce-overhead"], 22.0),
    "12gb": ("examples/train_12gb.json", [], 10.5),
}
# each preset's options on the tiny model (fast_tiny, graphs_tiny, 12gb_tiny): every bucket shape through inductor,
# samples and saves on the GPU in seconds; what the preset does on a multi-bucket dataset, not its speed
PRESETS.update({f"{name}_tiny": (config, [*extra, "--resume_ckpt", "builtin:tiny-sd"], cap)
                for name, (config, extra, cap) in list(PRESETS.items()) if name != "default"})
EPOCHS = os.environ.get("EPOCHS", "3")
CAPPED = ("import os, sys, torch; os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True'); "
          "torch.cuda.set_per_process_memory_fraction(min(1.0, float(sys.argv.pop(1)) * 2**30 / "
          "torch.cuda.get_device_properties(0).total_memory)); sys.path.insert(0, '.'); import train; "
          "sys.exit(train.main(sys.argv[1:]))")


def make_data() -> None:
    """Shapes of a colour on a background of another, captioned in the file name; 112 images per bucket."""
    from PIL import Image, ImageDraw
    if DATA.exists():
        return
    tmp = DATA.with_name("data.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = list(COLOURS)
    for i in range(PER_SIZE * len(SIZES)):
        w, h = SIZES[i % len(SIZES)]
        fg, bg = names[i % len(names)], names[(i // len(names) + 1 + i) % len(names)]
        bg = bg if bg != fg else names[(names.index(fg) + 3) % len(names)]
        img = Image.new("RGB", (w, h), COLOURS[bg])
        shape = ("circle", "square")[i % 2]
        box = (w // 4 + i % 17, h // 4 + i % 13, 3 * w // 4, 3 * h // 4)
        (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=COLOURS[fg])
        img.save(tmp / f"a {fg} {shape} on a {bg} background_{i}.jpg", quality=90)
    (WORK / "prompts.txt").write_text("a red circle on a blue background\na yellow square on a black background\n")
    tmp.rename(DATA)


def preset_args(name: str, logdir: Path, steps_per_epoch: int) -> list[str]:
    config, extra, _ = PRESETS[name]
    return ["--config", config, "--resume_ckpt", "builtin:sd15", "--data_root", str(DATA), "--logdir", str(logdir),
            "--project_name", name, "--max_epochs", EPOCHS, "--sample_prompts", str(WORK / "prompts.txt"),
            "--sample_steps", str(steps_per_epoch), "--save_every_n_epochs", "1", "--keep_last_n", "1",
            "--log_step", "5", "--latent_cache_dir", str(WORK / "latents"), *extra]


def batch_size(name: str) -> int:
    config, extra, _ = PRESETS[name]
    return int(extra[extra.index("--batch_size") + 1]) if "--batch_size" in extra else \
        json.loads((ROOT / config).read_text())["batch_size"]


def prewarm(names: list[str]) -> None:
    """Two steps of a preset on each bucket alone, the three buckets at once (one preset after the other, so the
    GPU's memory holds them): inductor's caches then hold every graph, and the timed runs compile from the cache,
    as a user's second run does. No saves, no samples (utils.perf.benchmark)."""
    for name in names:
        config, extra, _ = PRESETS[name]
        procs = []
        for w, h in SIZES:
            cmd = [sys.executable, "-m", "utils.perf.benchmark", "--arch", "sd15", "--image_size", str(w), str(h),
                   "--batch_size", str(batch_size(name)), "--steps", "1", "--warmup", "1",
                   "--workdir", str(WORK / f"prewarm-{name}-{w}x{h}"), "--config", config,
                   *[a for a in extra if a not in ("--batch_size", str(batch_size(name)))]]
            log = open(WORK / f"prewarm-{name}-{w}x{h}.log", "w")
            procs.append(((w, h), time.time(), subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)))
        for size, t0, proc in procs:
            proc.wait()
            print(f"prewarm {name} {size[0]}x{size[1]}: rc {proc.returncode} after {time.time() - t0:.0f} s "
                  f"(three compiling side by side)", flush=True)


def reference() -> dict:
    ref = ROOT / ".bench_ref" / "sd15_reference.py"
    out = subprocess.run([sys.executable, str(ref), "--batch", "6", "--steps", "15", "--warmup", "5"],
                         capture_output=True, text=True)
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    return json.loads(line) if line else {"error": out.stderr[-500:]}


def whole_run(name: str) -> dict:
    logdir = WORK / f"logs-{name}"
    shutil.rmtree(logdir, ignore_errors=True)
    steps_per_epoch = len(SIZES) * -(-PER_SIZE // batch_size(name))
    cmd = [sys.executable, "-c", CAPPED, str(PRESETS[name][2]), *preset_args(name, logdir, steps_per_epoch)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    run_dir = next((p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith(".")), None) \
        if logdir.exists() else None
    text = (run_dir / f"{run_dir.name}.log").read_text() if run_dir else proc.stderr
    result = {"preset": name, "rc": proc.returncode, "wall_s": round(wall, 1)}
    if done := re.search(r"done: (\d+) steps, \d+ epochs, (\d+) images in [\d.]+ min \(([\d.]+) images/s", text):
        result.update(steps=int(done[1]), images=int(done[2]), trainer_images_per_s=float(done[3]),
                      wall_images_per_s=round(int(done[2]) / wall, 2))
    result["compile_s"] = {m[0]: float(m[1]) for m in re.findall(r"torch\.compile: (\S+ batch \d+) compiled in "
                                                                r"([\d.]+) s", text)}
    result["samples"] = len(list((run_dir / "samples").glob("*"))) if run_dir else 0
    result["saves"] = text.count("saved ")
    result["skipped_samples"] = text.count("ran out of GPU memory and was skipped")
    if run_dir and (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_compile = max([r["step"] for r in rows if "performance/compile seconds" in r], default=0)
        windows = [r["performance/images per second"] for r in rows
                   if "performance/images per second" in r and r["step"] > last_compile + 5]
        result["steady_images_per_s"] = round(statistics.median(windows), 1) if windows else None
        result["peak_gib"] = round(max((r.get("performance/vram", 0) for r in rows), default=0), 2)
    if proc.returncode:
        result["error"] = (proc.stderr or text)[-800:]
    if run_dir:
        shutil.copy(run_dir / f"{run_dir.name}.log", WORK / f"{name}.log")
    shutil.rmtree(logdir, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    what, names = argv[0], argv[1:]
    WORK.mkdir(parents=True, exist_ok=True)
    make_data()
    if what == "prewarm":
        prewarm(names)
    elif what == "run":
        results = []
        first = [] if os.environ.get("NOREF") else ["reference"]   # NOREF=1: the reference ran earlier
        for name in [*first, *names]:  # each result printed as it comes: a command cut short keeps them
            results.append({"preset": "reference", **reference()} if name == "reference" else whole_run(name))
            print(json.dumps(results[-1]), flush=True)
        out = Path(os.environ.get("OUT", WORK))
        (out / f"whole_runs_{'_'.join(names)}.json").write_text(json.dumps(results, indent=1))
        print("\n| run | rc | wall s | images/s over the process | over the trainer's run | steady | compile s | "
              "peak GiB | samples | skipped samples |")
        for r in results:
            if r["preset"] == "reference":
                print(f"| reference (batch 6) | | | | | {r.get('images_per_s')} | | {r.get('peak_gib')} | | |")
                continue
            print(f"| {r['preset']} | {r['rc']} | {r['wall_s']} | {r.get('wall_images_per_s')} | "
                  f"{r.get('trainer_images_per_s')} | {r.get('steady_images_per_s')} | "
                  f"{sum(r['compile_s'].values()):.0f} ({len(r['compile_s'])} shapes) | {r.get('peak_gib')} | "
                  f"{r['samples']} | {r['skipped_samples']} |")
        for r in results:
            if r.get("error"):
                print(f"\n{r['preset']}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["run", "default"]))
