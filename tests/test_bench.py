"""bench.py's quick runs: each sub-command runs end to end on tiny shapes and prints its `reference | ours | ratio`
rows. The figures themselves live in BENCHMARKS.md; these runs keep the code paths (and the equality checks the
commands make between reference and ours before timing them) from rotting."""
import re
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("command,rows", [("splice", 4), ("padding", 2), ("data", 8), ("index", 2), ("stop", 1),
                                          ("dpo", 2), ("anyres", 1)])
def test_bench_command_runs_quick_and_reports_ratios(command, rows):
    done = subprocess.run([sys.executable, "bench.py", command, "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ratios = re.findall(r" (\d+\.\d\d)x ", done.stdout)
    assert len(ratios) >= rows, done.stdout
    assert all(float(r) > 0 for r in ratios)


def test_bench_plan_quick_holds_the_plan_to_the_real_step():
    """`bench.py plan --quick`: the tiny step planned on fake tensors and run for real, the same tracked peak."""
    done = subprocess.run([sys.executable, "bench.py", "plan", "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    planned, tracked = re.search(r"^tiny\s+([\d,.]+)\s+([\d,.]+)", done.stdout, re.M).groups()
    assert planned == tracked, done.stdout
