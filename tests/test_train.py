"""train.py end to end on CPU, through `accelerate launch` as a user runs it (and in-process for the cheap checks).

Tiny random checkpoints (tests/tiny_models.py), a small LLaVA JSON with Pillow images written here, a few steps each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ["circle", "square", "triangle", "star"]


def write_dataset(folder: Path, n: int = 24, text_only: int = 8) -> Path:
    """n image records (answers of different lengths) and text-only records, LLaVA JSON + PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (40 + 8 * (i % 3), 32), COLORS[color]).save(folder / f"img{i}.png")
        answer = " ".join([color] + SHAPES[: i % 4])   # 1 to 4 answer words
        records.append({"id": f"img{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": answer}]})
    for i in range(text_only):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": "describe one shape"}, {"from": "gpt", "value": " ".join(SHAPES[: 1 + i % 4])}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny checkpoints + dataset + a base recipe (dict) pointing at them."""
    from tests.tiny_models import save_tiny_checkpoints, save_tiny_tokenizer
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tok"))
    model_args = save_tiny_checkpoints(root / "ckpt", family="llama", hr="timm", tokenizer=tok)
    data_path = write_dataset(root / "data")
    recipe = {k: v for k, v in dataclasses.asdict(model_args).items() if v is not None}
    recipe.update(data_path=str(data_path), image_folder=str(data_path.parent), template="plain", max_length=64,
                  per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.25,
                  num_workers=0, report_to="none", logging_steps=1, save_steps=1000, seed=0, stage="pretrain",
                  lora_r=4, lora_alpha=8, lora_dropout=0.0)
    return {"root": root, "recipe": recipe}


def write_recipe(path: Path, recipe: dict, **overrides) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**recipe, **overrides}))
    return path


def run_in_process(argv: list[str], entry: str = "main"):
    """train.main (or train.command, which ends in SystemExit with the exit status) in this process; accelerate's
    singletons are reset so runs do not leak settings."""
    import train
    from accelerate.state import AcceleratorState, GradientState
    torch.set_num_threads(1)
    environ = dict(os.environ)
    try:
        return getattr(train, entry)(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        os.environ.clear()   # accelerate exports RANK=0, WORLD_SIZE=1, ...: a later launch would inherit them
        os.environ.update(environ)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl") if '"loss"' in line]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """Concurrent test runs must not collide on accelerate's default port 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, recipe: Path, *args, processes: int = 1, env=None, wait=True, script="train.py"):
    """`accelerate launch --config_file accelerate_configs/<config> train.py recipe ...`, as a user runs it (fp32 on
    CPU). Not `--cpu`: with it, accelerate 1.15 runs a multi-GPU config as one plain process."""
    cmd = [*LAUNCH, "--config_file", str(ROOT / "accelerate_configs" / config), "--mixed_precision", "no",
           "--num_processes", str(processes), "--main_process_port", str(free_port()),
           str(ROOT / script), str(recipe), *map(str, args)]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    return out


def trainables(output_dir, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(output_dir) / f"checkpoint-{step:06d}" / "trainable_0.safetensors")


def assert_same_run(a: Path, b: Path, step: int, atol=1e-6):
    """Same per-step losses and grad norms, same trainable weights at `step`."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, step + 1))
    torch.testing.assert_close(torch.tensor([m["loss"] for m in mb]), torch.tensor([m["loss"] for m in ma]),
                               rtol=1e-5, atol=atol)
    torch.testing.assert_close(torch.tensor([m["grad_norm"] for m in mb]),
                               torch.tensor([m["grad_norm"] for m in ma]), rtol=1e-4, atol=atol)
    wa, wb = trainables(a, step), trainables(b, step)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        # mining.key biases have a true gradient of exactly 0 (softmax ignores a shift shared by all keys); Adam
        # turns float noise there into moves of ~1e-6, whatever the process count: hence atol 1e-5 on weights.
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=max(atol, 1e-5),
                                   msg=lambda m, k=k: f"{k}: {m}")


# ---- the tests -----------------------------------------------------------------------------------------------------

def test_loss_goes_down_on_a_small_fixed_batch(tiny, tmp_path):
    """12 epochs of one batch of 4 (so also: epochs instead of max_steps), eval loss and tensorboard on."""
    data_path = write_dataset(tmp_path / "few", n=4, text_only=0)
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          data_path=str(data_path), image_folder=str(data_path.parent), per_device_batch_size=4,
                          gradient_accumulation_steps=1, learning_rate=2e-2, warmup_ratio=0.0, num_epochs=12,
                          eval_data_path=str(data_path), eval_steps=6, report_to="tensorboard")
    out = tmp_path / "run"
    export = run_in_process([str(recipe), "--output_dir", str(out)])
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    assert all(m["model_tflops_per_device"] > 0 and "mfu_llm" not in m for m in metrics(out))  # CPU: peak unknown
    evals = [m["eval_loss"] for m in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert list(out.glob("**/events.out.tfevents*")), "the tensorboard tracker wrote nothing"
    saved = yaml.safe_load(open(Path(export) / "train_config.yaml"))   # the resolved config, a valid recipe
    assert saved["num_epochs"] == 12 and saved["stage"] == "finetune" and saved["llm"] == tiny["recipe"]["llm"]


def test_packed_rows_train_and_export(tiny, tmp_path, capsys):
    """packing=True: rows hold several whole samples (data.PackedBatchSampler), counted as samples in the log;
    with a peak given, MFU (LLM-only and all parts) is on the log line and in metrics.jsonl."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          packing=True, max_length=96, max_steps=3)
    out = tmp_path / "run"
    export = run_in_process([str(recipe), "--output_dir", str(out), "--peak_tflops", "0.001"])
    logs = metrics(out)
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert all(m["samples_per_s"] > 0 for m in logs) and (Path(export) / "mgm_config.json").exists()
    for m in logs:
        assert 0 < m["mfu_llm"] < m["mfu_all"]
        assert m["mfu_all"] == pytest.approx(m["model_tflops_per_device"] / 0.001, rel=1e-5)
    assert re.search(r"step 3/3 \| .* \| MFU [\d.]+% LLM-only, [\d.]+% all", capsys.readouterr().out)


def test_sample_lengths_widen_images_and_split_packed_rows():
    """LLM positions per sample after the splice, as train.py counts attention FLOPs."""
    import data
    import train
    img = data.IMAGE_TOKEN_INDEX

    def sample(ids, images=0):
        return {"id": "x", "input_ids": torch.tensor(ids), "labels": torch.tensor(ids),
                "images": torch.zeros(images, 1, 3, 2, 2) if images else None, "images_aux": None}
    one, two, three = sample([1, img, 5], images=1), sample([1, 6]), sample([1, img, 7, img], images=2)
    padded = data.collate_rows([[one], [two]], pad_token_id=0, packed=False)
    assert train.sample_lengths(padded, tokens_per_image=10).tolist() == [12, 2]
    packed = data.collate_rows([[one, two], [three]], pad_token_id=0, packed=True)    # row 0 full, row 1 padded
    assert train.sample_lengths(packed, tokens_per_image=10).tolist() == [12, 2, 22, 0]


def test_mfu_is_model_flops_over_seconds_and_the_peak_of_every_device():
    import time

    import train
    meter = train.Throughput(peak_flops=1e12, num_processes=2)
    meter.add(tokens=1000, samples=4, flops=(3e11, 4e11))
    meter.start = time.time() - 2.0
    rates = meter.rates(sum_over_processes=lambda t: 2 * t)     # the other process did as much
    assert rates == pytest.approx({"tokens_per_s": 500, "samples_per_s": 2, "model_tflops_per_device": 0.2,
                                   "mfu_llm": 0.15, "mfu_all": 0.2}, rel=1e-3)
    unknown = train.Throughput(peak_flops=None)
    assert "mfu_llm" not in unknown.rates() and "mfu_all" not in unknown.rates()


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989),
                                         ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
                                         ("NVIDIA A10", 125), ("NVIDIA A10G", None), ("NVIDIA L4", 121),
                                         ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165),
                                         ("NVIDIA GeForce RTX 3090", 71), ("Tesla V100-SXM2-16GB", None)])
def test_peak_flops_by_gpu_name(monkeypatch, name, tflops):
    import train
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.peak_flops(torch.device("cuda")) == (tflops and tflops * 1e12)
    assert train.peak_flops(torch.device("cuda"), override_tflops=100) == 100e12


def test_peak_flops_on_cpu_is_unknown_unless_given():
    import train
    assert train.peak_flops(torch.device("cpu")) is None
    assert train.peak_flops(torch.device("cpu"), override_tflops=0.5) == 0.5e12


def test_a_failed_checkpoint_write_names_the_checkpoint_and_the_free_space(tmp_path):
    """torch reports a full disk as "enforce fail ... unexpected pos"; the error says what was being written."""
    import checkpoint
    from accelerate.utils import DistributedType

    def full_disk(path, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 576 vs 470")
    accelerator = SimpleNamespace(save_state=full_disk, distributed_type=DistributedType.NO)
    with pytest.raises(RuntimeError, match=r"writing checkpoint .*checkpoint-000007.tmp failed \(.* GB free there; "
                                           r"a full disk\?\): \[enforce fail"):
        checkpoint.save_checkpoint(accelerator, str(tmp_path), 7, {}, 1, {"id": "r", "settings": {}})


def test_a_run_owns_its_output_dir_and_resumes_only_itself(tiny, tmp_path, capsys):
    """Another run refuses an output_dir holding a run; --resume refuses changed defining settings, falls back past
    a torn checkpoint to the newest complete one, drops a torn metrics line, and an extended run follows the
    schedule of its new length; rotation spares other runs' checkpoints; --overwrite_output_dir starts over."""
    import checkpoint
    import train
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=3, save_steps=1, save_total_limit=2))
    out = tmp_path / "run"
    run_in_process([recipe, "--output_dir", str(out)])
    first = metrics(out)

    def checkpoints():
        return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints() == ["checkpoint-000002", "checkpoint-000003"]
    with pytest.raises(train.UserError, match=rf"output_dir {out} holds another run \(checkpoint-000002, "
                                                  r"checkpoint-000003, export, \.\.\.\): pass --resume auto"):
        run_in_process([recipe, "--output_dir", str(out), "--learning_rate", "0.02"])
    with pytest.raises(train.UserError, match=r"defining settings differ: learning_rate \(0.01 -> 0.02\), "
                                                  r"seed \(0 -> 1\)"):
        run_in_process([recipe, "--output_dir", str(out), "--resume", "auto", "--learning_rate", "0.02",
                        "--seed", "1"])

    # What makes a checkpoint incomplete: every file is checked, the RNG states of its processes included.
    good, copies = out / "checkpoint-000002", tmp_path / "copies"
    for name, damage in [("empty", lambda d: [f.unlink() for f in d.iterdir()]),
                         ("rng_missing", lambda d: (d / "random_states_0.pkl").unlink()),
                         ("rng_torn", lambda d: os.truncate(d / "random_states_0.pkl", 50)),
                         ("weights_torn", lambda d: os.truncate(d / "trainable_0.safetensors", 200))]:
        shutil.copytree(good, copies / name)
        damage(copies / name)
    assert checkpoint.checkpoint_problem(str(good)) is None
    assert checkpoint.checkpoint_problem(str(copies / "empty")) == "empty directory"
    assert checkpoint.checkpoint_problem(str(copies / "rng_missing")) == "random_states_0.pkl missing"
    assert checkpoint.checkpoint_problem(str(copies / "rng_torn")).startswith("random_states_0.pkl: truncated")
    assert checkpoint.checkpoint_problem(str(copies / "weights_torn")).startswith("trainable_0.safetensors: truncated")

    # A crash left the newest checkpoint torn and half a metrics line; another run's checkpoint sits alongside.
    os.truncate(out / "checkpoint-000003" / "optimizer.bin", 100)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    shutil.copytree(good, out / "checkpoint-000001")
    (out / "checkpoint-000001" / "run.json").write_text(json.dumps({"id": "another-run", "settings": {}}))
    capsys.readouterr()
    run_in_process([recipe, "--output_dir", str(out), "--resume", "auto", "--max_steps", "5", "--save_steps", "2"])
    printed = capsys.readouterr().out
    assert f"resume: skipping {out}/checkpoint-000003: optimizer.bin: truncated" in printed
    assert "dropped its torn last line 4" in printed and f"resumed from {good} at step 2" in printed
    again = metrics(out)
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5]
    assert again[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-5)   # same weights, data and RNG at step 3
    assert [m["lr"] for m in again[2:]] == pytest.approx(   # steps 3-5 as in a 5-step run, warmup ceil(0.25 * 5)
        [train.lr_at(s, peak=1e-2, warmup=2, total=5) for s in (2, 3, 4)])
    assert checkpoints() == ["checkpoint-000001", "checkpoint-000004", "checkpoint-000005"]

    # --overwrite_output_dir deletes the run's files, and only those; a full export has no stale pretrain weights.
    # Its eval set has no usable record: eval is skipped with the count, never reported as a loss of 0.
    (out / "notes.txt").write_text("mine")
    records = [{"id": f"gone{i}", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]} for i in range(2)]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    shutil.copytree(out / "export", tmp_path / "export")   # a pretrain export where the full one goes
    export = run_in_process([recipe, "--output_dir", str(out), "--overwrite_output_dir", "true", "--stage",
                             "finetune", "--template", "vicuna_v1", "--max_steps", "1", "--export_dir",
                             str(tmp_path / "export"), "--eval_data_path", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert ("overwrite_output_dir: deleted checkpoint-000001, checkpoint-000004, checkpoint-000005, export, "
            "metrics.jsonl, run.json") in printed
    assert f"eval skipped: no usable record in {tmp_path / 'eval.json'} (2 unusable eval records skipped)" in printed
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]   # no eval_loss line
    assert checkpoints() == ["checkpoint-000001"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "metrics.jsonl", "notes.txt", "run.json",
                                                     "train.lock"]
    assert (Path(export) / "model.safetensors").exists() and not (Path(export) / "mm_weights.safetensors").exists()


def test_switches_and_parameter_groups(tiny):
    """Tower tuning trains the last half of the CLIP layers that feed the selected layer and the last ConvNeXt
    stage; norms and biases get no weight decay; projector / mining / lr_multi set their own lr."""
    import settings
    import train
    recipe = str(write_recipe(tiny["root"] / "sw.yaml", tiny["recipe"]))

    def build(*overrides):
        model_args, _, args = settings.parse_args([recipe, "--stage", "finetune", *overrides])
        settings.check_args(model_args, args)
        return train.build(model_args, args, train.load_tokenizer(model_args.llm)), args

    model, args = build("--tune_vision_tower", "true", "--tune_vision_tower_aux", "true", "--weight_decay", "0.1",
                        "--mining_lr", "1e-3", "--lr_multi", "vision_tower_aux:0.5")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    clip = {n for n in trains if n.startswith("vision_tower.")}
    assert clip and all(".encoder.layers.0." in n for n in clip)  # 1 of 2
    aux = {n for n in trains if n.startswith("vision_tower_aux.")}
    assert aux and all(n.startswith("vision_tower_aux.stages.3.") for n in aux)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in train.param_groups(model, args) for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["mining.query.1.weight"])] == (1e-3, 0.1)       # a Linear after a LayerNorm
    assert lr_of[id(named["mining.query.0.weight"])] == (1e-3, 0.0)       # the LayerNorm
    assert all(lr_of[id(named[n])][0] == pytest.approx(0.5e-2) for n in aux)
    assert all(lr_of[id(named[n])][1] == 0.0 for n in trains if n.endswith("bias") or "norm" in n)
    assert lr_of[id(named["llm.model.layers.0.mlp.up_proj.weight"])] == (1e-2, 0.1)

    model, _ = build("--train_embeddings", "true")
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")} == \
        {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    model, _ = build("--freeze_projector", "true")
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert all(p.requires_grad for p in model.mining.parameters())


def test_gradient_accumulation_weights_every_supervised_token_equally(tiny):
    """One micro-batch of 4 and four micro-batches of 1 (answers of 1 to 4 words) give the same gradient; the
    naive mean of per-micro-batch means does not."""
    import data
    import settings
    import train
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    model_args, data_args, args = settings.parse_args([str(write_recipe(tiny["root"] / "ga.yaml", tiny["recipe"])),
                                                       "--stage", "finetune", "--template", "vicuna_v1"])
    tokenizer = train.load_tokenizer(model_args.llm)
    model = train.build(model_args, args, tokenizer)
    dataset = data.build_dataset(data_args, tokenizer, model.image_settings(), model.tokens_per_image)
    samples = [dataset[i] for i in range(4)]
    lengths = {int((s["labels"] != data.IGNORE_INDEX).sum()) for s in samples}
    assert len(lengths) == 4, "the four answers must have different lengths"
    collate = train.collate_fn(tokenizer)

    def grads(window, accumulation):
        accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
        model.zero_grad(set_to_none=True)
        train.forward_backward(accelerator, model, window, train.supervised_tokens(accelerator, window))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    one = grads([collate(samples)], 1)
    four = grads([collate([s]) for s in samples], 4)
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    for s in samples:   # what a per-micro-batch mean loss would do
        (model(**train.model_inputs(collate([s]), "cpu")).loss / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert not torch.allclose(naive["projector.0.weight"], one["projector.0.weight"], rtol=1e-3)


def test_dropped_samples_are_counted_and_an_emptied_micro_batch_still_steps(tiny, tmp_path):
    """Two image records whose files are missing form one micro-batch (the sampler never mixes modalities), which
    data.py empties; the step still runs on the text-only micro-batch and the counters reach the checkpoint."""
    folder = tmp_path / "data"
    records = [{"id": f"bad{i}", "image": f"missing{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": "red"}]}
        for i in range(2)]
    records += [{"id": f"txt{i}", "conversations": [
        {"from": "human", "value": "describe one shape"}, {"from": "gpt", "value": "circle square"}]} for i in range(2)]
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", template="vicuna_v1",
                          data_path=str(folder / "data.json"), image_folder=str(folder), max_steps=1, save_steps=1)
    run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
    assert 0 < metrics(tmp_path / "run")[0]["loss"] < 100
    state = torch.load(tmp_path / "run" / "checkpoint-000001" / "custom_checkpoint_0.pkl", weights_only=False)
    assert sum(state["skipped_samples"].values()) == 2, state


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_two_processes_give_the_update_of_one_big_batch(tiny, tmp_path, stage):
    """One epoch (4 steps), text-only steps included: in pretrain those reach no trainable through the text, and
    the model's zero-weighted vision pass keeps DDP's gradient sync in step."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage=stage, template="vicuna_v1",
                          max_steps=4, save_steps=4)
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process([str(recipe), "--output_dir", str(one), "--per_device_batch_size", "4"])
    out = launch("multi_gpu.yaml", recipe, "--output_dir", two, "--per_device_batch_size", "2", processes=2)
    # Some CPU launch variants start two independent single processes: make sure this one is really distributed.
    assert "distributed: DistributedType.MULTI_CPU, 2 process(es)" in out, out[-3000:]
    assert_same_run(one, two, step=4)


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch):
    import train
    real = train.forward_backward
    monkeypatch.setattr(train, "forward_backward", lambda *a: (float("nan"), *real(*a)[1:]))
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], max_steps=10, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row, the last at step 3; sample ids .*'(img|txt)"):
        run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])


def test_qlora_on_two_processes_trains_exports_and_the_merged_model_loads(tiny, tmp_path):
    import model as mgm
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage="finetune", tune="qlora", bits=4,
                          template="vicuna_v1", max_steps=3, learning_rate=1e-3, gradient_checkpointing=True)
    out = launch("multi_gpu.yaml", recipe, "--output_dir", tmp_path / "run", processes=2)   # distributed QLoRA
    assert "distributed: DistributedType.MULTI_CPU, 2 process(es)" in out, out[-3000:]
    assert len(metrics(tmp_path / "run")) == 3
    export = tmp_path / "run" / "export"
    assert json.loads((Path(export) / "mgm_config.json").read_text())["export"] == "lora"
    assert (Path(export) / "adapter").is_dir()
    merged = mgm.merge_lora_export(export, tmp_path / "merged")
    model = mgm.MiniGemini.from_pretrained(merged)
    ids = torch.tensor([[1, 5, 6]])
    assert model(input_ids=ids).logits.shape[:2] == (1, 3)


@pytest.mark.parametrize("stage,tune", [("pretrain", "full"), ("finetune", "lora")])
def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny, tmp_path, stage, tune):
    """6 steps uninterrupted == 3 steps, kill -9 while checkpoint-6 is being written, resume from checkpoint-3,
    3 more steps. The killed save leaves checkpoint-3 whole; RNG matters (LoRA dropout)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], stage=stage, tune=tune, max_steps=6, save_steps=3,
                          save_total_limit=1, lora_dropout=0.1, resume="auto",
                          template="plain" if stage == "pretrain" else "vicuna_v1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_in_process([str(recipe), "--output_dir", str(ref)])

    proc = launch("single_gpu.yaml", recipe, "--output_dir", run, env={"MGM_TEST_HANG_AT_SAVE": "6"}, wait=False,
                  script="tests/launch_train.py")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        hang = re.search(r"hanging pid=(\d+) at save:6", line)
        if hang:   # while it runs, its lock keeps a second run out of the directory
            import train
            with pytest.raises(train.UserError, match=rf"in use by another run \(pid {hang.group(1)} on"):
                run_in_process([str(recipe), "--output_dir", str(run)])
            os.kill(int(hang.group(1)), signal.SIGKILL)   # the training process itself
            break
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "".join(lines[-50:])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-000003", "checkpoint-000006.tmp"]

    out = launch("single_gpu.yaml", recipe, "--output_dir", run)
    assert "resumed from" in out and "checkpoint-000003 at step 3 (epoch 0, batch 6)" in out, out[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-000006"]
    assert_same_run(ref, run, step=6)
    saved = yaml.safe_load(open(run / "checkpoint-000006" / "train_config.yaml"))
    assert saved["stage"] == stage and saved["tune"] == tune


def test_a_run_whose_records_are_mostly_unusable_stops_early(tiny, tmp_path):
    """A wrong image_folder makes every image record "image not found": the run stops, naming the kinds."""
    import train
    (tmp_path / "wrong").mkdir()   # one that does not exist at all is refused at start (check_paths)
    recipe = write_recipe(tmp_path / "r.yaml", tiny["recipe"], image_folder=str(tmp_path / "wrong"),
                          per_device_batch_size=8, max_steps=20)
    with pytest.raises(train.UserError, match=r"records seen so far were unusable .*image not found"):
        run_in_process([str(recipe), "--output_dir", str(tmp_path / "run")])
