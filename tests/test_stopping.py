"""train.py stops cleanly: on SIGTERM / SIGUSR1 / a first Ctrl-C after the optimizer step under way, with a
checkpoint at that step and exit status STOPPED (75); before --max_time runs out; and the resumed run continues the
uninterrupted run's losses exactly.

Each run here is train.py's command (train.command, what `python train.py` runs) in this process, and the signal is
sent to this process by a wrapper around the code where it should land (a step, a checkpoint write, the model
build): it reaches train.py's handlers exactly as an outside kill would, at a known point. Real processes, several
ranks and DataLoader workers receiving the signal: tests/test_slurm.py.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

import pytest

from tests.test_train import assert_same_run, metrics, run_in_process, tiny, write_recipe  # noqa: F401,F811

STOPPED = 75
LORA = dict(stage="finetune", tune="lora", template="vicuna_v1", lora_dropout=0.1)   # RNG matters: LoRA dropout


def send_at(monkeypatch, point: str, *signals: int, gap: float = 0.05) -> None:
    """Send `signals` to this process at `point`: "step:N" (before step N's forward and backward), "save:N" (checkpoint
    N written but not yet renamed into place), "build" (while the model is built); `gap` seconds apart."""
    import checkpoint
    import train

    def send():
        for sig in signals:
            os.kill(os.getpid(), sig)
            time.sleep(gap)         # the handler runs before the next signal is sent

    where, _, n = point.partition(":")
    if where == "build":
        real_build = train.build
        monkeypatch.setattr(train, "build", lambda *a, **kw: (send(), real_build(*a, **kw))[1])
    elif where == "step":
        real_step, calls = train.forward_backward, []

        def step(*args):
            calls.append(1)
            if len(calls) == int(n):
                send()
            return real_step(*args)
        monkeypatch.setattr(train, "forward_backward", step)
    else:
        real_write = checkpoint.write_json

        def write(path, value):
            real_write(path, value)
            if Path(path).name == checkpoint.RUN_FILE and Path(path).parent.name == f"checkpoint-{int(n):06d}.tmp":
                send()
        monkeypatch.setattr(checkpoint, "write_json", write)


def exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as ended:
        run_in_process(argv, entry="command")
    return ended.value.code


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))


def assert_unlocked(run: Path):
    """The lock on output_dir is free: another process could take the run over."""
    with open(run / "train.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues_the_same_run(tiny, tmp_path, monkeypatch,
                                                                                          capsys):
    """SIGTERM during step 4 of 6: step 4 completes, checkpoint-000004 is written, exit status 75; --resume auto
    then gives exactly the losses and weights of the uninterrupted run."""
    import checkpoint
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], **LORA, max_steps=6, save_steps=100))
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([recipe, "--output_dir", str(ref), "--save_steps", "6"])

    send_at(monkeypatch, "step:4", signal.SIGTERM)
    assert exit_status([recipe, "--output_dir", str(run)]) == STOPPED
    out = capsys.readouterr()
    assert "stopped by SIGTERM at step 4: checkpoint-000004 written; continue with --resume auto" in out.out + out.err
    assert checkpoints(run) == ["checkpoint-000004"] and not (run / "export").exists()
    assert checkpoint.checkpoint_problem(str(run / "checkpoint-000004")) is None
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert_unlocked(run)

    monkeypatch.undo()
    assert exit_status([recipe, "--output_dir", str(run), "--resume", "auto"]) == 0
    assert_same_run(ref, run, step=6)


@pytest.mark.parametrize("gap,status,saved", [(1.2, 130, ["checkpoint-000002"]),
                                               (0.05, STOPPED, ["checkpoint-000002", "checkpoint-000003"])])
def test_a_second_ctrl_c_exits_at_once_and_the_last_checkpoint_stays_whole(tiny, tmp_path, monkeypatch, capsys, gap,
                                                                          status, saved):
    """A second Ctrl-C a moment later ends the run at once (status 130, one line, checkpoint 2 as it was); one
    within a second of the first is the same Ctrl-C delivered twice (by the terminal and by a launcher that forwards
    it): the run still finishes step 3 and stops with its checkpoint."""
    import checkpoint
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=6, save_steps=2))
    run = tmp_path / "run"
    send_at(monkeypatch, "step:3", signal.SIGINT, signal.SIGINT, gap=gap)
    assert exit_status([recipe, "--output_dir", str(run)]) == status
    err = capsys.readouterr().err
    assert ("train.py: interrupted" in err) == (status == 130) and "Traceback" not in err
    assert checkpoints(run) == saved
    assert all(checkpoint.checkpoint_problem(str(run / name)) is None for name in saved)
    assert_unlocked(run)


@pytest.mark.parametrize("point,line,saved", [
    ("save:2", "stopped by SIGUSR1 at step 3: checkpoint-000003 written", ["checkpoint-000002", "checkpoint-000003"]),
    ("build", "stopped by SIGUSR1 before the first step: no checkpoint written", [])])
def test_a_signal_during_a_checkpoint_write_or_before_training(tiny, tmp_path, monkeypatch, capsys, point, line, saved):
    """During the write of checkpoint 2 the signal lets the write finish and stops after the next step; while the
    model is being built it ends the run at once: no checkpoint, the lock released, one clear line."""
    import checkpoint
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=6, save_steps=2))
    run = tmp_path / "run"
    send_at(monkeypatch, point, signal.SIGUSR1)
    assert exit_status([recipe, "--output_dir", str(run)]) == STOPPED
    out = capsys.readouterr()
    assert line in out.out + out.err and "Traceback" not in out.out + out.err
    assert checkpoints(run) == saved
    assert all(checkpoint.checkpoint_problem(str(run / name)) is None for name in saved)
    assert_unlocked(run)


def test_max_time_stops_before_the_limit_with_a_checkpoint_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """Steps made to take 0.3 s; --max_time 4 stops the run with a checkpoint complete before 4 s have passed
    (judged from the step time and the checkpoint write); the resumed run equals the uninterrupted one."""
    import train
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=20, save_steps=100))
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([recipe, "--output_dir", str(ref), "--save_steps", "20"])

    real = train.forward_backward
    monkeypatch.setattr(train, "forward_backward", lambda *a: (time.sleep(0.3), real(*a))[1])
    begin = time.time()
    assert run_in_process([recipe, "--output_dir", str(run), "--max_time", "4"]) is None
    (stopped,) = checkpoints(run)
    step, written = int(stopped.split("-")[1]), (run / stopped).stat().st_mtime - begin
    assert 1 <= step < 20 and written < 4, (step, written)   # the checkpoint was complete before the limit
    monkeypatch.undo()
    run_in_process([recipe, "--output_dir", str(run), "--resume", "auto", "--save_steps", "20"])
    assert_same_run(ref, run, step=20)


def test_under_the_job_script_a_stop_exits_with_0_and_leaves_75_in_the_status_file(tiny, tmp_path, monkeypatch):
    """With MGM_EXIT_STATUS_FILE (slurm/train.sbatch sets it) a stop exits with 0, which torchrun's agent and srun
    do not report as a failure, and the file holds STOPPED for the job script; a crash still raises, status 1."""
    import train
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=6))
    status = tmp_path / "status"
    monkeypatch.setenv("MGM_EXIT_STATUS_FILE", str(status))
    send_at(monkeypatch, "build", signal.SIGUSR1)
    assert exit_status([recipe, "--output_dir", str(tmp_path / "run")]) == 0
    assert status.read_text() == f"{STOPPED}\n"

    def crash(*args, **kwargs):
        raise RuntimeError("a crash")
    monkeypatch.setattr(train, "build", crash)
    with pytest.raises(RuntimeError, match="a crash"):
        run_in_process([recipe, "--output_dir", str(tmp_path / "run")], entry="command")
    assert status.read_text() == "1\n"
