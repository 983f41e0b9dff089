"""train.py under `accelerate launch`, with two test-only additions (tests/test_engines.py uses it):

    accelerate launch --config_file accelerate_configs/fsdp.yaml tests/launch_train.py recipe.yaml [--field value ...]

- FSDP without a GPU: torch's FSDP2 (`fully_shard`) runs on CPU over gloo, but accelerate 1.15 selects FSDP only
  for GPU-like devices, and no config field or environment variable changes that. When the launched config asks
  for FSDP and no accelerator is visible, accelerate's shared state is turned into FSDP as it is created, so
  train.main's Accelerator runs FSDP2 (train.py itself refuses such a config on CPU).
- DeepSpeed without a GPU: DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op with g++ when its
  process group starts (about 25 s on a fresh clone); only its inference all-reduce uses that op, never training,
  so it is marked unavailable here and ZeRO's collectives go through gloo as they do anyway.
- MGM_SHARDS_FILE=path: after the first optimizer step each rank appends, for every parameter, how many elements it
  holds and the full size (ZeRO-3 and FSDP2 shard parameters; DDP and ZeRO-2 hold them whole) to path.<rank>; after
  the second step's backward, the bytes it holds as parameters, gradients and optimizer state to path.memory.<rank>
  (tests/test_plan.py holds the memory plan to them).
- MGM_TEST_HANG_AT_SAVE=N (tests/test_train.py's kill -9 test): once checkpoint N is written but not yet renamed
  into place, print "hanging pid=<pid> at save:N" and sleep, so the test can kill the process there.
train.command: train.py's exit statuses; train.main shuts the process group down itself.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402


def main():
    if train.requested_engine() == DistributedType.FSDP and not train.has_accelerator():
        run_fsdp_on_cpu()
    if train.requested_engine() == DistributedType.DEEPSPEED and not train.has_accelerator():
        skip_deepspeed_shm_op()
    if os.environ.get("MGM_SHARDS_FILE"):
        record_shards_after_first_step(os.environ["MGM_SHARDS_FILE"])
    if os.environ.get("MGM_TEST_HANG_AT_SAVE"):
        hang_before_the_rename(int(os.environ["MGM_TEST_HANG_AT_SAVE"]))
    train.command(sys.argv[1:])


def run_fsdp_on_cpu():
    """After AcceleratorState is set up (MULTI_CPU over gloo, from Accelerator(cpu=True)), make it FSDP with the
    plugin accelerate built from the config (Accelerator passes it in; the CPU branch ignores it)."""
    init = AcceleratorState.__init__

    def init_as_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_as_fsdp


def skip_deepspeed_shm_op():
    """DeepSpeed's TorchBackend builds its shared-memory op only when the op is listed as compatible."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def record_shards_after_first_step(path: str):
    forward_backward = train.forward_backward

    def recording(accelerator, model, *rest):
        out = forward_backward(accelerator, model, *rest)
        recording.calls += 1
        if recording.calls == 1:
            sizes = {name: held_and_full(p) for name, p in model.named_parameters()}
            with open(f"{path}.{accelerator.process_index}", "w") as f:
                json.dump(sizes, f)
        if recording.calls == 2:       # a later step: the optimizer state of the first is there
            with open(f"{path}.memory.{accelerator.process_index}", "w") as f:
                json.dump(held_bytes(model, accelerator._optimizers[0].optimizer), f)
        return out

    recording.calls = 0
    train.forward_backward = recording


def hang_before_the_rename(step: int):
    """The run file is the last thing checkpoint.save_checkpoint writes into checkpoint-N.tmp before the rename."""
    write_json = checkpoint.write_json

    def write_json_then_hang(path: str, value: dict) -> None:
        write_json(path, value)
        if Path(path).name == checkpoint.RUN_FILE and Path(path).parent.name == f"checkpoint-{step:06d}.tmp":
            print(f"hanging pid={os.getpid()} at save:{step}", flush=True)
            while True:
                time.sleep(60)

    checkpoint.write_json = write_json_then_hang


def held_and_full(p) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole parameter)."""
    from torch.distributed.tensor import DTensor
    if hasattr(p, "ds_tensor"):              # DeepSpeed ZeRO-3: the local partition, unless gathered or persistent
        return p.numel() or p.ds_tensor.numel(), p.ds_numel
    if isinstance(p, DTensor):               # FSDP2: the local shard of a DTensor
        return p.to_local().numel(), p.numel()
    return p.numel(), p.numel()


def held_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this rank holds at the end of a step's backward: parameters and buffers (ZeRO-3 partitions and
    persistent parameters, FSDP2 shards, flat buffers counted once), gradients, and optimizer state (Adam's moments and steps;
    DeepSpeed's fp32 master partitions too)."""
    from torch.distributed._tools.common_utils import get_untyped_storages
    seen = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            for storage in get_untyped_storages(t):
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    params = list(model.parameters())
    parameters = nbytes([q for p in params for q in (p, getattr(p, "ds_tensor", None)) if q is not None and q.numel()]
                        + list(model.buffers()))
    inner = getattr(optimizer, "optimizer", optimizer)        # DeepSpeed's ZeRO optimizer wraps torch's AdamW
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_partitioned_groups_flat", [])
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"parameters": parameters, "gradients": nbytes([p.grad for p in params if p.grad is not None]),
            "optimizer": nbytes(list(masters) + state)}


if __name__ == "__main__":
    main()
