"""Run many repository commands the way a user does (`python <script> <args>`), in seconds instead of minutes: this
interpreter imports the heavy libraries once, then runs each command in a child process forked from it, as
__main__, with its own argv, working directory, environment, stdout / stderr and exit status. A command sees what
`python script.py` would, except that the modules it imports are already loaded.

    python tests/run_commands.py cases.json results.json
    cases.json:   [{"argv": ["train.py", "--help"], "cwd": "/tmp/x", "env": {"COLUMNS": "1000"}}, ...]
    results.json: [{"status": 0, "stdout": "...", "stderr": "..."}, ...], in the same order

argv[0] is a script of the repository root; "env" (optional) is added to the environment.
"""
import json
import os
import runpy
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("train", "eval", "convert", "data", "model", "bench", "demo", "chat", "web")   # what the commands import


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    sys.path.insert(0, REPO)
    for name in PRELOAD:
        __import__(name)
    results = [run_forked(case["argv"], case["cwd"], case.get("env", {})) for case in cases]
    with open(results_path, "w") as f:
        json.dump(results, f)


def run_forked(argv: list[str], cwd: str, env: dict) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:   # the child never returns: its exit status is the command's
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os._exit(run_as_main(argv, cwd, env))
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"status": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def run_as_main(argv: list[str], cwd: str, env: dict) -> int:
    """The script as `python` runs it: SystemExit gives the exit status, an uncaught exception its traceback and 1."""
    try:
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [os.path.join(REPO, argv[0]), *argv[1:]]
        sys.path[0] = REPO
        runpy.run_path(sys.argv[0], run_name="__main__")
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - reported as python reports it
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return status


if __name__ == "__main__":
    main(*sys.argv[1:])
