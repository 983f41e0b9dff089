"""bench.py's quick runs: each sub-command runs end to end on tiny shapes and prints its `reference | ours | ratio`
rows. The figures themselves live in BENCHMARKS.md; these runs keep the code paths (and the equality checks the
commands make between reference and ours before timing them) from rotting."""
import os
import re

import pytest
import torch

import bench


@pytest.mark.parametrize("command,rows", [("splice", 4), ("padding", 2), ("data", 8), ("index", 2), ("stop", 1),
                                          ("dpo", 2), ("anyres", 1)])
def test_bench_command_runs_quick_and_reports_ratios(command, rows, capsys):
    out = quick_bench(command, capsys)
    ratios = re.findall(r" (\d+\.\d\d)x ", out)
    assert len(ratios) >= rows, out
    assert all(float(r) > 0 for r in ratios)


def test_bench_plan_quick_holds_the_plan_to_the_real_step(capsys):
    """`bench.py plan --quick`: the tiny step planned on fake tensors and run for real, the same tracked peak."""
    out = quick_bench("plan", capsys)
    planned, tracked = re.search(r"^tiny\s+([\d,.]+)\s+([\d,.]+)", out, re.M).groups()
    assert planned == tracked, out


def quick_bench(command: str, capsys) -> str:
    """`python bench.py COMMAND --quick`'s output, run in this process (the variants that need a fresh interpreter
    get one from bench.py itself); the environment and torch's thread count are left as they were."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        bench.main([command, "--quick"])
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    return capsys.readouterr().out
