#!/usr/bin/env bash
# One GPU session's measurements, run side by side with the reference loop so ratios share one machine and
# one moment. Usage: bash bench/gpu_suite.sh [suite]   (suites below). Prints a table at the end; writes
# results.tsv and the logs to $OUT (or /tmp/gpu_out).
#   needs: .whl/ (diffusers, bitsandbytes wheels for the GPU machine's Python) and .bench_ref/sd15_reference.py
#   (a copy of ../shared/bench/sd15_reference.py); both are git-ignored and carried to the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
REF=.bench_ref/sd15_reference.py
LOGS=/tmp/gpu_logs
mkdir -p "$LOGS"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, diffusers, transformers, accelerate, bitsandbytes, platform
print(f"date {__import__('datetime').date.today()} gpu {torch.cuda.get_device_name(0)} python {platform.python_version()} "
      f"torch {torch.__version__} diffusers {diffusers.__version__} transformers {transformers.__version__} "
      f"accelerate {accelerate.__version__} bitsandbytes {bitsandbytes.__version__}")
PY

# run NAME CMD...: keep the last JSON line the command prints
run() {
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local json; json=$(grep '^{' "$LOGS/$name.log" | tail -1)
  [ -z "$json" ] && json="{\"rc\": $rc, \"wall_s\": $((SECONDS - t0))}"
  printf '%s\t%s\n' "$name" "$json" >> "$RESULTS"
  grep -E "error|Error|^\{" "$LOGS/$name.log" | tail -2
}

suite=${1:-e2e}
case "$suite" in
  e2e)   # issue 2: quickstart on the GPU, then SD1.5 at 512 px, batch 6, fp16 + AdamW8bit, ours beside the reference
    run quickstart bash -c "python3 train.py --config examples/quickstart.json --logdir /tmp/qs && echo '{\"quickstart\": \"ok\"}'"
    run ref_b6_fp16_8bit python3 $REF --batch 6 --steps 30 --warmup 5
    run ours_b6_fp16_8bit python3 -m utils.benchmark --arch sd15 --batch_size 6 --steps 30 --warmup 5 --mixed_precision fp16 --optimizer_config null
    run ours_b6_bf16_8bit python3 -m utils.benchmark --arch sd15 --batch_size 6 --steps 30 --warmup 5 --mixed_precision bf16 --optimizer_config null
    ;;
  opt)   # issue 3: data pipeline alone; issue 4: every optimizer, 20 steps; issue 5: EMA on CPU vs GPU
    run data_512_w15 python3 -m utils.benchmark --data_only --resolution 512 --image_size 768 640 --batch_size 6 --images 1200 --num_workers 15
    run ref_b6_fp16_8bit python3 $REF --batch 6 --steps 20 --warmup 5
    for opt in adamw adamw8bit lion lion8bit prodigy dadapt_adam dadapt_lion dadapt_sgd adafactor adamw_schedulefree; do
      printf '{"base": {"optimizer": "%s"}}' "$opt" > "/tmp/opt_$opt.json"
      run "opt_$opt" python3 -m utils.benchmark --arch sd15 --batch_size 6 --steps 20 --warmup 5 --workdir /tmp/bench_sd15 --optimizer_config "/tmp/opt_$opt.json" --mixed_precision bf16
    done
    for dev in cpu cuda; do
      run "ema_${dev}_every_step" python3 -m utils.benchmark --arch sd15 --batch_size 6 --steps 20 --warmup 5 --workdir /tmp/bench_sd15 --optimizer_config null --mixed_precision bf16 --ema_decay_rate 0.999 --ema_update_interval 1 --ema_device $dev
    done
    ;;
  *) echo "unknown suite $suite"; exit 2 ;;
esac

tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t", 1) for line in open(sys.argv[1]) if line.strip()]
print(f"\n{'run':<28}{'images/s':>10}{'step ms':>10}{'peak GiB':>10}{'reserved':>10}")
for name, js in rows:
    d = json.loads(js)
    peak = d.get("peak_allocated_gib", d.get("peak_gib", ""))
    print(f"{name:<28}{str(d.get('images_per_s', d.get('oom') and 'OOM' or '')):>10}{str(d.get('step_ms', '')):>10}"
          f"{str(peak):>10}{str(d.get('peak_reserved_gib', d.get('reserved_gib', ''))):>10}")
PY
