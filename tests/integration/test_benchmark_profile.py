"""python -m utils.benchmark --profile N on the tiny model (CPU: the ops' self time stands in for device time)."""
import json


def test_benchmark_profile_reports_time_by_category(tmp_path, capsys):
    from utils.perf.benchmark import run
    result = run(["--arch", "tiny-sd", "--resolution", "64", "--batch_size", "2", "--steps", "3", "--warmup", "1",
                  "--profile", "2", "--workdir", str(tmp_path), "--num_workers", "0"])
    assert result["images_per_s"] > 0 and result["timed_steps"] == 3
    profile = result["profile"]
    assert profile and all(isinstance(v, float) and v >= 0 for v in profile.values())
    assert list(profile.values()) == sorted(profile.values(), reverse=True)
    from utils.run.train_step import PHASES   # the trainer's profiler ranges reach the report (GPU idle needs CUDA)
    assert set(result["profile_host_ms"]) == set(PHASES) and all(v > 0 for v in result["profile_host_ms"].values())
    assert "profile_idle" not in result
    lines = capsys.readouterr().out.strip().splitlines()
    assert "profile: CPU self time per step by category, over 2 steps" in lines
    assert any(line.startswith("top ") for line in lines)
    assert lines[-1].startswith("{") and '"profile"' in lines[-1]
    # the profiled steps ran after the timed ones: warm-up 1 + timed 3 + profiled 2
    rows = [json.loads(line) for f in tmp_path.glob("logs/*/metrics.jsonl") for line in f.read_text().splitlines()]
    assert max(row["step"] for row in rows) == 6


def test_benchmark_with_several_image_sizes_trains_several_buckets(tmp_path):
    from utils.perf.benchmark import run
    result = run(["--arch", "tiny-sd", "--resolution", "128", "--batch_size", "2", "--steps", "3", "--warmup", "1",
                  "--images", "8", "--image_size", "128", "128", "--image_size", "192", "96",
                  "--workdir", str(tmp_path), "--num_workers", "0", "--write_schedule", "true"])
    assert result["images_per_s"] > 0
    schedules = list(tmp_path.glob("logs/*/ep0_batch_schedule.txt"))
    sizes = {line.split("\t")[1] for line in schedules[0].read_text().splitlines()[1:]}
    assert len(sizes) == 2, sizes
