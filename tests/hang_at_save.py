"""train.py, made to block once checkpoint step N is written but not yet renamed into place, so a test can kill -9
the process there: `accelerate launch ... tests/hang_at_save.py recipe.yaml [--key value ...]` with
MGM_TEST_HANG_AT_SAVE=N in the environment. It prints "hanging pid=<pid> at save:N" and sleeps."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402

STEP = int(os.environ["MGM_TEST_HANG_AT_SAVE"])
write_json = train.write_json


def write_json_then_hang(path: str, value: dict) -> None:
    """The run file is the last thing written into checkpoint-N.tmp before the rename."""
    write_json(path, value)
    if Path(path).name == train.RUN_FILE and Path(path).parent.name == f"checkpoint-{STEP:06d}.tmp":
        print(f"hanging pid={os.getpid()} at save:{STEP}", flush=True)
        while True:
            time.sleep(60)


train.write_json = write_json_then_hang

if __name__ == "__main__":
    train.main()
