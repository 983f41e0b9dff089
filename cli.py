"""What every command shares: a user's mistake is one line on stderr and a non-zero exit, never a traceback.

    from cli import UserError, run
    ...
        raise UserError(f"--data: {path} does not exist (relative to {os.getcwd()})")
    ...
    if __name__ == "__main__":
        run(main, "eval.py")      # prints "eval.py: --data: ... does not exist ..." and exits with status 2

A UserError is something the user can fix (a path, a setting, a refused conversion); anything else is a bug of ours
and keeps its traceback.
"""
from __future__ import annotations

import sys


class UserError(ValueError):
    """A mistake the user can fix, reported as one line `<command>: <message>` with exit status `status`
    (2 for usage errors, as argparse does)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def run(main, command: str, argv: list[str] | None = None):
    """main(argv); a UserError becomes one line on stderr and its exit status, Ctrl-C the line "interrupted" and
    status 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"{command}: {e}", file=sys.stderr, flush=True)
        sys.exit(e.status)
    except KeyboardInterrupt:   # Ctrl-C (train.py: the second one) is the user's choice, not a crash
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
