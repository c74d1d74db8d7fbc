"""The benchmark scripts the README names answer --help with their usage, as any command does, on a
machine without a GPU too (before: gpu_parity.py took --help for a device and gpu_profile.py for a
case, each in a traceback; gpu_check.sh took it for its output folder, printing mkdir's help)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_fsdp.py", "gpu_parity.py", "gpu_profile.py", "cpu_profile.py"])
def test_each_benchmark_script_answers_help(script):
    command = ["bash"] if script.endswith(".sh") else [sys.executable]
    out = subprocess.run([*command, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{script}" in out.stdout and "usage" in out.stdout.lower(), out.stdout


def test_a_misspelt_profile_case_is_one_line():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "coatnet-float64-inference"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: unknown case 'coatnet-float64-inference'" in out.stderr
