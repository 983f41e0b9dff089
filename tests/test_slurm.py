"""slurm/train.sbatch on one machine, with stand-ins for SLURM: 2 "nodes" of 1 process each on 127.0.0.1.

The stand-in srun starts the job script's command once per node with SLURM_NODEID set, as srun does; the stand-in
scontrol answers `show hostnames` and `show job` (its restart count) and records `requeue`. The first test plays SLURM's part: it starts the job with SLURM's
variables, sends the --signal warning (SIGUSR1) mid-training, and starts the job again when the script asked for a
requeue. SIGUSR1 goes to every process of the second node's task only (its launcher, its training process, its
DataLoader worker), and SIGTERM (what a preemption sends) to the first node's launcher only, so one test shows all of
it: the launchers leave both signals to the training processes, the rank SIGUSR1 reached stops the other rank after
the same step through the step's all-reduce, the checkpoint is complete, the log holds no launcher traceback or
error, the script asks for the requeue, the requeued job resumes, and the losses equal those of one uninterrupted
run with the same global batch. With a stand-in accelerate (a run stopped with status 75) the script's requeue
decision alone; and a plain `accelerate launch` of a stop, which ends with status 1.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_train import (ROOT, assert_same_run, free_port, launch, run_in_process, tiny,  # noqa: F401,F811
                              write_recipe)

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
# scontrol stand-in: every node is this machine; the job has been restarted $SCONTROL_RESTARTS times (SLURM counts a
# requeue it makes itself at once); a requeue is recorded in $SCONTROL_LOG, or fails when $SCONTROL_REQUEUE_FAILS is set
case "$1 $2" in
    "show hostnames") for _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done ;;
    "show job") echo "   Requeue=1 Restarts=${SCONTROL_RESTARTS:-${SLURM_RESTART_COUNT:-0}} BatchFlag=1 Reboot=0" ;;
    requeue*) if [ -n "${SCONTROL_REQUEUE_FAILS:-}" ]; then echo "Job has already finished for job $2" >&2; exit 1; fi
              echo "requeue $2" >> "$SCONTROL_LOG" ;;
    *) echo "scontrol stand-in: $*" >&2; exit 1 ;;
esac
'''
ACCELERATE = '''#!/bin/bash
# accelerate stand-in: a run that stopped early with its checkpoint, as train.py leaves it under the job script
echo 75 > "$MGM_EXIT_STATUS_FILE"
'''
LAUNCHER_NOISE = ("Traceback", "ChildFailedError", "failed (exitcode", "error:")   # torchrun's and srun's failures


def test_a_preempted_job_requeues_itself_and_the_requeued_job_resumes_the_same_run(tiny, tmp_path):
    import checkpoint
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", tune="lora", template="vicuna_v1",
                          max_steps=16, save_steps=100, num_workers=1)   # no dropout: masks differ with 2 processes
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([str(recipe), "--output_dir", str(ref), "--per_device_batch_size", "4", "--save_steps", "16"])

    config = yaml.safe_load(open(ROOT / "accelerate_configs" / "multi_gpu.yaml"))
    config["mixed_precision"] = "no"     # fp32, as the reference (bf16 autocast on CPU would differ)
    (tmp_path / "multi_gpu.yaml").write_text(yaml.safe_dump(config))
    env, requeues = job_environment(tmp_path, SRUN, SCONTROL)
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
    assert not [noise for noise in LAUNCHER_NOISE if noise in out], out[-4000:]   # a planned stop, not a failure
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


@pytest.mark.parametrize("restarts,requeue_fails,says,status", [
    (None, False, "stopped early with a checkpoint; requeueing", 0),   # the time limit's warning: the script asks
    ("1", False, "stopped early with a checkpoint; SLURM has requeued the job already", 0),   # preempted
    (None, True, "scontrol requeue failed: submit the same command again", 75)])   # cancelled meanwhile
def test_the_job_script_asks_for_a_requeue_only_when_slurm_has_not_made_one(tmp_path, restarts, requeue_fails, says,
                                                                            status):
    """A run stopped with its checkpoint (status 75): before the time limit the script requeues the job itself;
    preempted (or `scontrol requeue` from outside), SLURM has requeued it already and counted a restart, so the
    script says so and asks for nothing; when neither can be (the job was cancelled), it says to submit again."""
    env, requeues = job_environment(tmp_path, SRUN, SCONTROL, ACCELERATE)
    env.update(SLURM_NNODES="1", SLURM_RESTART_COUNT="0")
    if restarts:
        env["SCONTROL_RESTARTS"] = restarts
    if requeue_fails:
        env["SCONTROL_REQUEUE_FAILS"] = "1"
    job = subprocess.run(["bash", str(JOB_SCRIPT), "recipe.yaml", "config.yaml"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert job.returncode == status and says in job.stdout, job.stdout
    assert requeues.exists() == (says.endswith("requeueing")), job.stdout   # asked for only when SLURM had not
    assert ("scontrol requeue failed" in job.stdout) == (status == 75), job.stdout


def job_environment(tmp_path: Path, *stand_ins: str) -> tuple[dict, Path]:
    """The environment SLURM starts the job script with (2 nodes of 1 GPU), the stand-ins first on PATH; and the file
    where the stand-in scontrol records requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for text in stand_ins:
        name = {SRUN: "srun", SCONTROL: "scontrol", ACCELERATE: "accelerate"}[text]
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requeues = tmp_path / "requeues.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SCONTROL_LOG": str(requeues), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
           "MAIN_PROCESS_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env, requeues


def test_a_plain_accelerate_launch_ends_with_status_1_on_a_stop_and_says_75(tiny, tmp_path):
    """Without the job script train.py's 75 reaches torchrun's agent, which takes any non-zero status of a process
    for a failure: its ChildFailedError names exit code 75, and accelerate launch ends with status 1."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=40, save_steps=100)
    launcher = launch("multi_gpu.yaml", recipe, "--output_dir", tmp_path / "run", wait=False)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if re.search(r"step 2/40 \|", line):
            for process in psutil.Process(launcher.pid).children(recursive=True):   # the training process
                process.send_signal(signal.SIGUSR1)
            break
    out = "".join(lines) + launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 1, out[-4000:]
    assert re.search(r"stopped by SIGUSR1 at step \d+: checkpoint-\d+ written", out), out[-4000:]
    assert "ChildFailedError" in out and re.search(r"exitcode\s*: 75", out), out[-4000:]
