"""tools/bench_70b.py (the GPU measurement) runs at its tiny size on CPU and reports what it should."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_70b_tiny_runs_every_phase_and_checks_itself(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tools" / "bench_70b.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["done"] and report["shape"]["num_hidden_layers"] == 4
    assert report["checks"]["layer_major_loss"] == report["checks"]["plain_order_loss"]
    assert report["checks"]["recompute_max_abs_diff"] == 0.0
    probe = report["fsdp2_probe"]
    assert probe["hooks"]["same_output"] and probe["hooks"]["same_input_grad"]
    assert "accepted" in probe["fsdp2_cpu_offload"] or "error" in probe["fsdp2_cpu_offload"]
    streamed = report["streamed"]
    assert streamed["streamed_layers"] == 2 and streamed["max_in_flight"] <= 2
    assert streamed["bytes_streamed_per_step"] > 0 and len(streamed["steps"]) == 3
    assert report["resident"]["s_per_step"] > 0 and len(report["resident"]["steps"]) == 3
    plan = report["plan"]  # the planner's choice for the 70B run, which a GPU run follows and checks
    assert 0 < plan["resident_layers"] < 80 and plan["predicted_reserved_gib"] > 0 and "host_ram_gib" in plan
