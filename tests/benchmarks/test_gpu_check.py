"""`make gpu-check` on a machine without CUDA: one line saying so, no traceback; and its table."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import format_table, recipe_sizes

REPO = Path(__file__).resolve().parents[2]


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out",
                           str(tmp_path / "g.json")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA device" in proc.stderr and not (tmp_path / "g.json").exists()


def test_the_recipes_model_and_sizes():
    assert recipe_sizes() == {"backbone": "resnet50", "size": 448, "target": 128, "batch": 8,
                              "classes": 20}


def test_table_shows_every_measure():
    step = {"cam_only_ms": 80.0, "cam_ppc_ms": 84.0, "ppc_added": 0.05, "peak_mib": 9000.0,
            "syncs_per_step": 2.0, "steps": 20}
    result = {"device": "NVIDIA H100", "torch": "2.14.1", "cuda": "13.0", "sizes": {},
              "steps": {"fp32": step, "bf16": step},
              "loss": [{"grid": "16x16", "term_diff": 1e-6, "grad_diff": 2e-7, "ours_ms": 1.0,
                        "reference_ms": 30.0},
                       {"grid": "56x56", "error": "boom", "ours_ms": 2.0, "reference_ms": 90.0}]}
    table = format_table(result)
    assert "| fp32 | 80.0 | 84.0 | +5.0% | 9000 | 2.0 |" in table
    assert "| 16x16 | 1.00e-06 | 2.00e-07 | 1.0 | 30.0 |" in table and "error: boom" in table
