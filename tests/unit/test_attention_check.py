"""bench/attention_check.py (a GPU script) runs end to end on tiny CPU shapes and ends with its JSON line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_attention_check_cpu_smoke():
    out = subprocess.run([sys.executable, "bench/attention_check.py", "--cpu-smoke", "--model", "both"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"sd15", "sd21"}
    for totals in result.values():
        assert set(totals) == {"math", "default", "math_error", "default_error"}
        assert totals["math"] > 0 and totals["default"] > 0
        assert 0 < totals["math_error"] < 0.05 and 0 < totals["default_error"] < 0.05   # bf16 vs fp32


def test_attention_shapes_follow_the_unet_configs():
    from bench.attention_check import attention_shapes
    sd15 = attention_shapes("sd15")
    assert sum(calls for _, _, calls in sd15) == 32          # 16 transformer blocks, self + cross each
    assert [s for _, s, _ in sd15[::2]] == [(16, 8, 4096, 4096, 40), (16, 8, 1024, 1024, 80),
                                           (16, 8, 256, 256, 160), (16, 8, 64, 64, 160)]
    assert sd15[1][1] == (16, 8, 4096, 77, 40)
    assert [s for _, s, _ in attention_shapes("sd21")[::2]] == [(6, 5, 9216, 9216, 64), (6, 10, 2304, 2304, 64),
                                                                (6, 20, 576, 576, 64), (6, 20, 144, 144, 64)]
