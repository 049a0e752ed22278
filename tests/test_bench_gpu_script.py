"""scripts/bench_gpu.py (issue 8's GPU bench) runs end to end; here on the CPU, scaled down, so that the
script a GPU session runs has been exercised before it gets there."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def test_gpu_bench_script_runs_both_runners_on_a_scaled_down_7b_shape(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "fp32", "--layers", "1",
                           "--hidden-size", "128", "--seq-length", "32", "--steps", "1", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for runner in ("petformers", "hf_peft"):
        r = result[runner]
        assert r["runner"] == runner and r["seq_length"] == 32 and r["shape"]["num_layers"] == 1
        assert r["shape"]["vocab_size"] == 32000 and r["shape"]["hidden_size"] == 128
        assert r["trained_tokens_per_s"] > 0 and 0 < r["mfu"] <= 1.0 and math.isfinite(r["final_loss"])
        # Random tokens over 32,000 ids: the loss of an untrained model is near ln(32000) = 10.37.
        assert abs(r["final_loss"] - math.log(32000)) < 1.0
        # LoRA r16 on q, k, v, o of one 128-wide layer: 4 x 16 x (128 + 128).
        assert r["lora_params"] == 4 * 16 * (128 + 128)
    assert result["ratios"]["throughput_vs_hf_peft"] > 0
