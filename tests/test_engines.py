"""The engines of accelerate_configs/ really run train.py: DeepSpeed ZeRO-2, ZeRO-3 (+ its MoE config), FSDP2 and
DeepSpeed over two machines, each on 2 CPU processes over gloo, against one process with the same global batch.
(DDP: tests/test_train.py, which also shows that one process and two DDP processes give the same run.)

Every 2-process run takes 4 optimizer steps with a checkpoint at step 2 and serves several checks:
- the `distributed:` line names the engine, and the run exits cleanly (exit code 0);
- its per-step losses equal the 1-process run's to 1e-5;
- its export is whole (the same files and tensors as the 1-process export, not shards) and gives the same logits;
- ZeRO-3 and FSDP2 runs really shard: during training a rank holds only part of a parameter;
- the finetune runs hold per rank what plan.py plans for them (parameters, optimizer state; FSDP2's gradients);
- resumed runs: checkpoint-4 and the export are deleted, `--resume auto` continues from checkpoint-2 and must give
  steps 3 and 4 and the export again.
Every launch goes through tests/launch_train.py (train.py plus test-only additions): accelerate 1.15 selects FSDP
only on GPUs (train.py refuses fsdp.yaml on a CPU-only machine; tested below), and DeepSpeed's CPU build of a
shared-memory op that training never uses is skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import (DIST_VARS, LAUNCH, ROOT, free_port, metrics, run_in_process, tiny,  # noqa: F401
                              write_recipe)
from tests.tiny_models import save_tiny_checkpoints, tiny_batch

ENGINES = {  # config, the script launched, the `distributed:` line
    "zero2": ("deepspeed_zero2.yaml", "tests/launch_train.py", "DistributedType.DEEPSPEED (ZeRO-2), 2 process(es)"),
    "zero3": ("deepspeed_zero3.yaml", "tests/launch_train.py", "DistributedType.DEEPSPEED (ZeRO-3), 2 process(es)"),
    "zero3_moe": ("deepspeed_zero3_moe.yaml", "tests/launch_train.py",
                  "DistributedType.DEEPSPEED (ZeRO-3), 2 process(es)"),
    "fsdp2": ("fsdp.yaml", "tests/launch_train.py", "DistributedType.FSDP (FSDP2), 2 process(es)"),
}
RECIPES = {  # on top of the tiny recipe: 4 steps of 2 micro-batches of 4 samples (2 per process), checkpoint at 2
    "pretrain": dict(stage="pretrain", template="plain"),
    "finetune": dict(stage="finetune", template="vicuna_v1", mm_use_im_start_end=True),   # + 2 new token rows
    "lora": dict(stage="finetune", template="vicuna_v1", tune="lora"),
    "moe": dict(stage="finetune", template="vicuna_v1"),                                  # a Mixtral LLM
    "init_from": dict(stage="finetune"),          # from a full export: its model, tokenizer and template (vicuna_v1)
}
# Weights whose true gradient is exactly 0: Adam turns float noise there into moves of up to ~1e-4, which depend on
# the order of the sums. mining.key biases (softmax ignores a shift shared by all keys); the router of a top-1 MoE
# (the selected expert's weight is renormalized to 1).
GRADIENT_FREE = re.compile(r"mining\.key\.\d+\.bias|block_sparse_moe\.gate\.weight")


@pytest.fixture(scope="module")
def reference(tiny, tiny_export, tmp_path_factory):
    """name -> (recipe path, output dir of its 1-process run with per_device_batch_size 4), each run once."""
    done = {}

    def run(name):
        if name not in done:
            folder = tmp_path_factory.mktemp(f"ref-{name}")
            overrides = dict(RECIPES[name], max_steps=4, save_steps=2, save_total_limit=2)
            if name == "moe":
                tok = tiny["root"] / "tok"
                overrides["llm"] = save_tiny_checkpoints(tiny["root"] / "ckpt", family="mixtral",
                                                         tokenizer=_tokenizer(tok)).llm
            base = tiny["recipe"]
            if name == "init_from":
                from tests.test_init_from import user_recipe
                base = user_recipe(tiny, tiny_export, Path(tiny["recipe"]["data_path"]))
            recipe = write_recipe(folder / "recipe.yaml", base, **overrides)
            run_in_process([str(recipe), "--output_dir", str(folder / "run"), "--per_device_batch_size", "4"])
            done[name] = recipe, folder / "run"
        return done[name]
    return run


@pytest.mark.parametrize("engine,recipe,resume", [  # one resume per engine, where frozen weights stay out of it
    ("zero2", "lora", True),          # ZeRO-2 finetune: the two-machine test; pretrain (frozen LLM): under ZeRO-3
    ("zero3", "pretrain", True), ("zero3", "finetune", False), ("zero3", "init_from", False),
    ("zero3_moe", "moe", False),
    ("fsdp2", "pretrain", False), ("fsdp2", "finetune", False), ("fsdp2", "lora", True)])
def test_two_processes_equal_one(reference, tmp_path, engine, recipe, resume):
    recipe_path, ref = reference(recipe)
    config, script, line = ENGINES[engine]
    run = tmp_path / "run"
    shards = tmp_path / "shards"
    out = launch(config, script, recipe_path, "--output_dir", run, env={"MGM_SHARDS_FILE": str(shards)})
    assert line in out, out[-3000:]
    assert_same_losses(ref, run)
    assert_same_export(ref / "export", run / "export")
    if engine.startswith(("zero3", "fsdp2")):
        assert_sharded(shards)
    if recipe == "finetune":
        assert_planned_as_held(recipe_path, engine, shards)
    if resume:
        for step_4 in (run / "checkpoint-000004", run / "export"):
            shutil.rmtree(step_4)
        out = launch(config, script, recipe_path, "--output_dir", run, "--resume", "auto")
        assert f"resumed from {run / 'checkpoint-000002'} at step 2" in out, out[-3000:]
        assert_same_losses(ref, run)
        assert_same_export(ref / "export", run / "export")


def test_deepspeed_over_two_machines(reference, tmp_path):
    """multi_node.yaml (ZeRO-2, one process per machine here): machine_rank 0 and 1 on this machine, main process
    127.0.0.1, give the one-process losses and export, and hold per rank what plan.py plans for ZeRO-2."""
    recipe_path, ref = reference("finetune")
    port = free_port()
    shards = tmp_path / "shards"
    machines = [launch("multi_node.yaml", "tests/launch_train.py", recipe_path, "--output_dir", tmp_path / "run",
                       wait=False, env={"MGM_SHARDS_FILE": str(shards)},
                       launch_args=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                                    "127.0.0.1", "--main_process_port", str(port)], processes=2)
                for rank in (0, 1)]
    outs = [finish(proc) for proc in machines]
    assert "DistributedType.DEEPSPEED (ZeRO-2), 2 process(es)" in outs[0], outs[0][-3000:]
    assert_same_losses(ref, tmp_path / "run")
    assert_same_export(ref / "export", tmp_path / "run" / "export")
    assert_planned_as_held(recipe_path, "zero2", shards)


def test_a_config_asking_for_an_engine_this_machine_cannot_run_stops(tiny, tmp_path, monkeypatch):
    """fsdp.yaml without a GPU: accelerate would run plain DDP (or unconnected processes); train.py stops instead."""
    import train
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on GPUs")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")   # what `accelerate launch --config_file fsdp.yaml` exports
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=1)
    with pytest.raises(train.UserError, match=r"asks for FSDP, but accelerate set up NO on cpu: accelerate .* selects "
                                              r"FSDP only on GPU-like devices"):
        run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_image_token_rows_on_weights_zero3_has_partitioned(tiny):
    """model.add_image_tokens on an LLM that transformers loaded inside deepspeed.zero.Init (ZeRO-3 with
    zero3_init_flag true; train.py builds with full weights): the new rows are the mean of the old ones, not NaN."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    import model as mgm
    from tests.launch_train import skip_deepspeed_shm_op
    environ, compatible = dict(os.environ), dict(deepspeed.ops.__compatible_ops__)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    zero3 = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    try:
        llm = AutoModelForCausalLM.from_pretrained(tiny["recipe"]["llm"])
        assert llm.get_input_embeddings().weight.numel() == 0, "not partitioned"
        tokenizer = AutoTokenizer.from_pretrained(tiny["recipe"]["llm"])
        old = len(tokenizer)
        ids = mgm.add_image_tokens(llm, tokenizer)
        assert ids == [old, old + 1]
        weights = [llm.get_input_embeddings().weight, llm.get_output_embeddings().weight]
        with deepspeed.zero.GatheredParameters(weights):
            for weight in weights:
                assert weight.shape[0] == old + 2 and torch.isfinite(weight).all()
                torch.testing.assert_close(weight[old:], weight[:old].mean(0).expand(2, -1))
    finally:
        unset_hf_deepspeed_config()   # later from_pretrained calls in this process load normally again
        torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        deepspeed.ops.__compatible_ops__.update(compatible)


# ---- helpers -------------------------------------------------------------------------------------------------------

def launch(config: str, script: str, recipe: Path, *args, env=None, wait=True, launch_args=None, processes=2):
    """`accelerate launch --config_file accelerate_configs/<config> <script> recipe ...` on 2 CPU processes, fp32,
    with per_device_batch_size 2 (the 1-process reference runs 4)."""
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_configs" / config), "--mixed_precision", "no",
           "--num_processes", str(processes),
           *(launch_args or ["--main_process_port", str(free_port())]),
           str(ROOT / script), str(recipe), "--per_device_batch_size", "2", *map(str, args)]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc if not wait else finish(proc)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "terminate called" not in out, out[-4000:]   # gloo torn down at exit: exit -6 on an unlucky run
    return out


def assert_same_losses(ref: Path, run: Path):
    ma, mb = metrics(ref), metrics(run)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    losses = torch.tensor([m["loss"] for m in mb])
    assert torch.isfinite(losses).all(), losses
    torch.testing.assert_close(losses, torch.tensor([m["loss"] for m in ma]), rtol=1e-5, atol=1e-5)


def assert_same_export(ref: Path, export: Path):
    """The same weight files holding the same tensors (gathered, not shards), and the same logits once loaded."""
    from model import MiniGemini
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.safetensors"))
    assert files and sorted(p.relative_to(export) for p in export.rglob("*.safetensors")) == files
    for name in files:
        a, b = load_file(ref / name), load_file(export / name)
        assert a.keys() == b.keys(), name
        for k in a:
            atol = 1e-3 if GRADIENT_FREE.search(k) else 1e-5
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{name} {k}: {m}")
    assert json.loads((export / "mgm_config.json").read_text())["export"] == \
        json.loads((ref / "mgm_config.json").read_text())["export"]
    models = [MiniGemini.from_pretrained(path) for path in (ref, export)]
    batch = tiny_batch(models[0])
    with torch.no_grad():
        logits = [m(**batch).logits for m in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def assert_sharded(shards: Path):
    """Each rank held only part of the largest parameters during the first step, and together all of them."""
    ranks = [json.loads(Path(f"{shards}.{rank}").read_text()) for rank in (0, 1)]
    largest = sorted(ranks[0], key=lambda name: -ranks[0][name][1])[:5]
    for name in largest:
        held = [rank[name][0] for rank in ranks]
        full = ranks[0][name][1]
        assert all(0 < h < full for h in held) and sum(held) >= full, (name, held, full)


def assert_planned_as_held(recipe: Path, engine: str, shards: Path):
    """plan.py's per-rank parameters and optimizer state for this launch (and FSDP2's gradients) are the bytes rank 0
    held after the second step's backward (tests/launch_train.py records them). DeepSpeed has freed its gradient
    partitions by then (its step runs inside backward), so the planned ZeRO gradients have nothing to meet here."""
    import plan
    import settings
    model_args, data_args, args = settings.parse_args([str(recipe), "--per_device_batch_size", "2"])
    planned = plan.plan(model_args, data_args, args, plan.Launch(engine, 2, "no", plan.GiB))
    held = json.loads(Path(f"{shards}.memory.0").read_text())
    kinds = ["parameters", "optimizer"] + (["gradients"] if engine == "fsdp2" else [])
    assert {k: planned.terms[k].bytes for k in kinds} == {k: held[k] for k in kinds}


def _tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)

