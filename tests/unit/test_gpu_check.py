"""bench/gpu_check.py works before a GPU is found: its CPU miniature runs every step and prints the table."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_in_miniature_on_the_cpu():
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split("|")[1].strip() for line in table[2:]]
    assert sum(c.startswith("gpu test test_") for c in checks) == 4
    for expected in ("DCGAN-32 batch 32 fp32: gan.loop.fit / plain",
                     "DCGAN-32 batch 32 bf16 + channels_last: plain loop", "DCGAN-32: fit bf16 / fp32",
                     "evaluate 500 samples on cpu", "DDP gloo 2 CPU processes"):
        assert expected in checks, (expected, checks)
