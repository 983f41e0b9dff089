"""plan.py: the memory plan of a training step, held against the same step run for real on CPU (tiny models).

The engines' per-rank figures (ZeRO-2, ZeRO-3, FSDP2 on 2 processes) are held against what those runs hold, in
tests/test_engines.py, which launches them anyway.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import plan
import settings
import train
from cli import UserError
from data import DataArguments
from tests.test_train import ROOT, run_in_process, tiny, write_recipe  # noqa: F401
from tests.tiny_models import save_tiny_checkpoints

SETUPS = {  # name: (stage, tune, gradient checkpointing)
    "finetune": ("finetune", "full", False),
    "lora": ("finetune", "lora", True),
    "pretrain": ("pretrain", "full", False),
    "finetune+checkpointing": ("finetune", "full", True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """name -> (model_args, data_args, args, its plan on one process), each planned once."""
    model_args = save_tiny_checkpoints(tmp_path_factory.mktemp("plan"), tokenizer=tok)
    data_args = DataArguments(data_path="-", max_length=40)
    done = {}

    def get(name):
        if name not in done:
            stage, tune, checkpointing = SETUPS[name]
            m = dataclasses.replace(model_args, gradient_checkpointing=checkpointing)
            args = settings.TrainArguments(stage=stage, tune=tune, per_device_batch_size=3, lora_r=4, lora_dropout=0.0)
            done[name] = m, data_args, args, plan.plan(m, data_args, args, plan.Launch("single", 1, "no", plan.GiB))
        return done[name]
    return get


@pytest.mark.parametrize("name", ["finetune", "lora", "pretrain"])
def test_planned_bytes_are_those_of_the_real_step(setup, name):
    """Parameters, gradients and optimizer state: the bytes of the tensors a real step on CPU allocates; the peak:
    what the same tracker counts for the same step on real tensors (within 5%; exact in practice)."""
    model_args, data_args, args, planned = setup(name)
    model, batch = real_model_and_batch(model_args, data_args, args)
    optimizer = train.make_optimizer(model, args)
    model.train()
    model(**batch, num_items_in_batch=torch.tensor(100)).loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert planned.terms["parameters"].bytes == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert planned.terms["gradients"].bytes == sum(p.grad.nbytes for p in trainable)
    assert planned.terms["optimizer"].bytes == sum(t.nbytes for s in optimizer.state.values() for t in s.values())

    model, batch = real_model_and_batch(model_args, data_args, args)
    real = plan.step_memory(model, args, batch, mixed_precision="no")
    assert planned.peak.bytes == pytest.approx(real.peak, rel=0.05)
    assert planned.terms["activations"].bytes == pytest.approx(real.peak_activations, rel=0.05)


def test_gradient_checkpointing_lowers_the_activation_term(setup):
    without, with_ = setup("finetune")[3], setup("finetune+checkpointing")[3]
    assert with_.terms["activations"].bytes < 0.9 * without.terms["activations"].bytes
    assert with_.terms["parameters"].bytes == without.terms["parameters"].bytes


def test_a_plan_that_does_not_fit_names_one_that_does_and_writes_nothing(tiny, setup, tmp_path, capsys):
    """train.py --plan on a device just too small for the recipe: the verdict, and a suggestion that fits, which
    planning it again confirms. No output_dir, no lock: the plan takes nothing from a run."""
    planned = setup("finetune")[3]
    device_gb = planned.peak.bytes / plan.USABLE / plan.GiB * 0.98
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny["recipe"], stage="finetune", per_device_batch_size=4,
                          gradient_accumulation_steps=2)
    run = tmp_path / "run"
    run_in_process([str(recipe), "--plan", "--device_memory_gb", str(device_gb), "--output_dir", str(run)])
    out = capsys.readouterr().out
    assert "verdict: does not fit" in out, out
    options = re.search(r"^suggestion: (.*) \(planned peak .* per device: fits\)$", out, re.M).group(1)
    assert not run.exists()
    argv = [str(recipe), *options.split(), "--device_memory_gb", str(device_gb)]
    model_args, data_args, args = settings.parse_args(argv)
    launch = plan.Launch("single", 1, "no", int(device_gb * plan.GiB))
    assert plan.plan(model_args, data_args, args, launch).fits
    assert args.per_device_batch_size * args.gradient_accumulation_steps == 8   # the same global batch


def test_a_lora_plan_prints_no_bitsandbytes_lines(tiny, tmp_path):
    """peft imports bitsandbytes, whose import logs warnings about its 4-bit kernels ("Failed to load CPU
    gemm_4bit_forward from kernels-community ..." on a CPU with AVX512-BF16); no 4/8-bit weight is involved here, so
    they stay out of the output. A fresh process: in this one bitsandbytes may be imported already."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny["recipe"], stage="finetune", tune="lora", template="vicuna_v1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), str(recipe), "--plan", "--device_memory_gb", "24",
                           "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0 and "verdict: fits" in done.stdout, done.stdout[-4000:]
    assert not re.search(r"bitsandbytes|gemm_4bit|kernels-community", done.stdout), done.stdout[-4000:]


def test_the_launch_comes_from_accelerate_or_the_named_config(monkeypatch):
    args = settings.TrainArguments(device_memory_gb=80)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert plan.launch_for(args) == plan.Launch("zero3", 8, "bf16", 80 * plan.GiB, "--device_memory_gb")
    assert plan.launch_for(dataclasses.replace(args, plan_processes=2)).processes == 2
    for name in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    named = plan.launch_for(dataclasses.replace(args, plan_config="accelerate_configs/fsdp.yaml"))
    assert (named.engine, named.processes, named.mixed_precision, named.fsdp["fsdp_version"]) == ("fsdp2", 8, "bf16", 2)
    assert plan.launch_for(dataclasses.replace(args, plan_config="accelerate_configs/single_gpu.yaml")).engine == \
        "single"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(UserError, match="does not model CPU offload"):
        plan.launch_for(args)


def test_only_rank_0_plans(monkeypatch, capsys):
    """Under accelerate launch every process runs train.py: the others leave before building anything."""
    monkeypatch.setenv("RANK", "3")
    plan.main(None, None, settings.TrainArguments(plan=True))   # would fail on None if it went on
    assert capsys.readouterr().out == ""


def test_quantized_bytes_follow_bitsandbytes_layout():
    """plan.quantized_bytes against a weight bitsandbytes really quantizes as model.load_llm asks (NF4, double
    quantization): the packed values and every tensor of the quantization state."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(96, 4160, dtype=torch.bfloat16)
    packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
    state = packed.quant_state
    tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert plan.quantized_bytes(weight.numel(), weight.shape[0], 4) == sum(t.nbytes for t in tensors)


# ---- helpers -------------------------------------------------------------------------------------------------------

def real_model_and_batch(model_args, data_args, args):
    """The model the plan builds, with real weights, and the plan's worst-case batch with real images."""
    torch.manual_seed(0)
    model = train.build(dataclasses.replace(model_args, random_init=True), args, None)
    batch = plan.worst_case_batch(model, data_args, args.per_device_batch_size, plan.PlanFakeMode())
    batch["images"], batch["images_aux"] = torch.randn(batch["images"].shape), torch.randn(batch["images_aux"].shape)
    return model, batch
