"""slurm/train.sbatch on one machine, with stand-ins for SLURM: 2 "nodes" of 1 process each on 127.0.0.1.

The stand-in srun starts the job script's command once per node with SLURM_NODEID set, as srun does; the stand-in
scontrol answers `show hostnames` and records `requeue`. The test plays SLURM's part: it starts the job with SLURM's
variables, sends the --signal warning (SIGUSR1) mid-training, and starts the job again when the script asked for a
requeue. SIGUSR1 goes to every process of the second node's task only (its launcher, its training process, its
DataLoader worker), and SIGTERM (what a preemption sends) to the first node's launcher only, so one test shows all of
it: the launchers leave both signals to the training processes, the rank SIGUSR1 reached stops the other rank after
the same step through the step's all-reduce, the checkpoint is complete, the script asks for the
requeue, the requeued job resumes, and the losses equal those of one uninterrupted run with the same global batch.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from tests.test_train import ROOT, assert_same_run, free_port, run_in_process, tiny, write_recipe  # noqa: F401,F811

JOB_SCRIPT = ROOT / "slurm" / "train.sbatch"
SRUN = '''#!/usr/bin/env python3
"""srun stand-in: the command once per node (SLURM_NNODES), with SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID set as
srun sets them; exits with the largest exit status of the tasks."""
import os, subprocess, sys
command = sys.argv[1:]
while command[0].startswith("-"):
    command.pop(0)
tasks = [subprocess.Popen(command, env={**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
                                        "SLURM_LOCALID": "0"}) for node in range(int(os.environ["SLURM_NNODES"]))]
sys.exit(max(task.wait() for task in tasks))
'''
SCONTROL = '''#!/bin/bash
# scontrol stand-in: every node is this machine; a requeue is recorded in $SCONTROL_LOG
case "$1 $2" in
    "show hostnames") for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done ;;
    requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
    *) echo "scontrol stand-in: $*" >&2; exit 1 ;;
esac
'''


def test_a_preempted_job_requeues_itself_and_the_requeued_job_resumes_the_same_run(tiny, tmp_path):
    import checkpoint
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", tune="lora", template="vicuna_v1",
                          max_steps=16, save_steps=100, num_workers=1)   # no dropout: masks differ with 2 processes
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([str(recipe), "--output_dir", str(ref), "--per_device_batch_size", "4", "--save_steps", "16"])

    config = yaml.safe_load(open(ROOT / "accelerate_configs" / "multi_gpu.yaml"))
    config["mixed_precision"] = "no"     # fp32, as the reference (bf16 autocast on CPU would differ)
    (tmp_path / "multi_gpu.yaml").write_text(yaml.safe_dump(config))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requeues = tmp_path / "requeues.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SCONTROL_LOG": str(requeues), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
           "MAIN_PROCESS_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = ["bash", str(JOB_SCRIPT), str(recipe), str(tmp_path / "multi_gpu.yaml"), "--output_dir", str(run)]

    first = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if re.search(r"step 2/16 \|", line):
            srun = psutil.Process(first.pid).children()[0]
            tasks = {p.environ()["SLURM_NODEID"]: p for p in srun.children()}   # each node's accelerate launch
            for process in [tasks["1"], *tasks["1"].children(recursive=True)]:  # SLURM's warning, to node 1's
                process.send_signal(signal.SIGUSR1)
            tasks["0"].send_signal(signal.SIGTERM)   # and a SIGTERM to node 0's launcher, which must leave it alone
            break
    out = "".join(lines) + first.communicate(timeout=180)[0]
    assert first.returncode == 0, out[-4000:]
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint-0*\1 written", out)
    assert stopped and int(stopped.group(1)) < 16, out[-4000:]
    assert "death signal" not in out, out[-4000:]   # torchrun's agent did not act on the SIGTERM (nor forward it)
    assert "stopped early with a checkpoint; requeueing" in out and requeues.read_text() == "requeue 4242\n"
    assert not (run / "export").exists()
    step = int(stopped.group(1))   # one complete checkpoint, written by both ranks (their RNG states) at that step
    assert checkpoint.checkpoint_problem(str(run / f"checkpoint-{step:06d}")) is None
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (run / f"checkpoint-{step:06d}").iterdir()}

    second = subprocess.run(job, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-4000:]
    assert f"resumed from {run / f'checkpoint-{step:06d}'} at step {step}" in second.stdout, second.stdout[-4000:]
    assert "train.py exited with status 0" in second.stdout and requeues.read_text() == "requeue 4242\n"
    assert (run / "export").is_dir()
    assert_same_run(ref, run, step=16)
