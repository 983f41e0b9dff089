"""Every command answers a user's mistake with one line `<command>: <what is wrong>` and a non-zero exit (2 for
usage errors), never a traceback; every option of every command has a --help text; a refused training start
leaves the other run's directory byte for byte as it was.

The commands run as real processes (tests/run_commands.py: forked from one interpreter that imported the
libraries once), each mistake as a new user would make it."""
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import cli

# (id, command line, exit status, what the one line must say); {fx} is the fixtures' directory, {cwd} the working
# directory the commands run in (relative paths are relative to it).
MISTAKES = [
    ("train-llm-relative-missing", "train.py {fx}/r.yaml --llm runs/nope", 2,
     r"^train.py: llm: runs/nope: no such directory \(relative to {cwd}\), and not a hub name in the cache "
     r"\(HF_HUB_OFFLINE=1\)$"),
    ("train-llm-absolute-missing", "train.py {fx}/r.yaml --llm {fx}/nope", 2, r"llm: {fx}/nope: no such directory$"),
    ("train-llm-not-a-checkpoint", "train.py {fx}/r.yaml --llm {fx}/not_an_export", 2,
     r"llm: {fx}/not_an_export holds no config.json, so it is not a transformers causal LM checkpoint"),
    ("train-tower-is-a-file", "train.py {fx}/r.yaml --vision_tower {fx}/q.jsonl", 2,
     r"vision_tower: {fx}/q.jsonl is a file"),
    ("train-random-init-4-bit", "train.py {fx}/r.yaml --random_init true --bits 4 --tune qlora --stage finetune", 2,
     r"random_init with bits 4: .* use bits 16"),
    ("train-lora-in-pretrain", "train.py {fx}/r.yaml --tune lora", 2, r"tune lora with stage pretrain"),
    ("train-not-a-number", "train.py {fx}/r.yaml --learning_rate abc", 2,
     r"argument --learning_rate: invalid float value: 'abc' \(train.py --help lists the options\)"),
    ("train-unknown-attention", "train.py {fx}/r.yaml --attention flash", 2,
     r"attention: 'flash' is out of range, allowed: .*sdpa"),
    ("train-data-wrong-kind", "train.py {fx}/r.yaml --data_path {fx}/r.yaml", 2,
     r"data_path: {fx}/r.yaml is not a .json / .jsonl / .parquet file"),
    ("train-data-plain-directory", "train.py {fx}/r.yaml --data_path {fx}/not_an_export", 2,
     r"data_path: {fx}/not_an_export is a directory but not a saved datasets one"),
    ("train-recipe-missing", "train.py {fx}/nope.yaml", 2, r"recipe: {fx}/nope.yaml: no such file$"),
    ("train-another-run", "train.py {fx}/r.yaml --output_dir {fx}/other_run", 2,
     r"output_dir {fx}/other_run holds another run \(checkpoint-000002, metrics.jsonl\): pass --resume auto"),
    ("train-another-run-no-lock", "train.py {fx}/r.yaml --output_dir {fx}/other_run_no_lock", 2,
     r"output_dir {fx}/other_run_no_lock holds another run"),
    ("eval-data-missing", "eval.py --model {fx}/export --data missing.jsonl", 2,
     r"^eval.py: --data: missing.jsonl: no such file \(relative to {cwd}\)$"),
    ("eval-model-missing", "eval.py --model {fx}/nope --data {fx}/q.jsonl", 2,
     r"--model: {fx}/nope: no such directory"),
    ("eval-model-not-an-export", "eval.py --model {fx}/not_an_export --data {fx}/q.jsonl", 2,
     r"--model: {fx}/not_an_export is not a Mini-Gemini export \(no mgm_config.json\)"),
    ("eval-unknown-template", "eval.py --model {fx}/export --data {fx}/q.jsonl --template nope", 2,
     r"--template: 'nope' is none of .*vicuna_v1"),
    ("eval-batch-size-0", "eval.py --model {fx}/export --data {fx}/q.jsonl --batch_size 0", 2,
     r"argument --batch_size: '0' is not an integer >= 1"),
    ("convert-hr-tower-refused", "convert.py to-llava-hf {fx}/export {cwd}/hf", 2,
     r"{fx}/export cannot become a transformers Llava model: it has an HR tower"),
    ("convert-source-without-config", "convert.py from-mgm {fx}/not_an_export {cwd}/out", 2,
     r"{fx}/not_an_export: no config.json \(an MGM / LLaVA checkpoint directory has one\)"),
    ("convert-destination-not-empty", "convert.py to-llava-hf {fx}/export {fx}/not_an_export", 2,
     r"dst: {fx}/not_an_export already holds files"),
    ("data-check-tokenizer-missing", "data.py check {fx}/q.jsonl --tokenizer {fx}/nope --template plain", 2,
     r"^data.py: --tokenizer: {fx}/nope: no such directory$"),
    ("data-check-tokenizer-not-cached", "data.py check {fx}/q.jsonl --tokenizer runs/nope --template plain", 2,
     r"--tokenizer: runs/nope: no such directory \(relative to {cwd}\), and not a hub name in the cache"),
    ("data-check-data-missing", "data.py check {fx}/nope.json --tokenizer {fx}/tokenizer --template plain", 2,
     r"data: {fx}/nope.json: no such file or directory"),
    ("merge-not-an-export", "model.py merge {fx}/not_an_export {cwd}/merged", 2,
     r"^model.py: src: {fx}/not_an_export is not a Mini-Gemini export"),
    ("merge-not-lora", "model.py merge {fx}/export {cwd}/merged", 2,
     r"src: {fx}/export is a full export, not a LoRA one"),
    ("bench-batch-size-0", "bench.py padding --batch_size 0", 2, r"^bench.py: argument --batch_size: '0' is not"),
    ("demo-unknown-override", "demo.py --pretrain_overrides=--max_step=2", 2,
     r"^demo.py: --pretrain_overrides: unknown setting\(s\) --max_step=2"),
    ("demo-no-test-images", "demo.py --test_images 0", 2, r"--test_images: 0 is out of range, allowed: >= 1"),
    ("chat-model-missing", "chat.py --model {fx}/nope hi", 2, r"^chat.py: --model: {fx}/nope: no such directory$"),
    ("chat-model-not-an-export", "chat.py --model {fx}/not_an_export hi", 2,
     r"--model: {fx}/not_an_export is not a Mini-Gemini export"),
    ("chat-image-missing", "chat.py --model {fx}/export --image nope.png hi", 2, r"--image: image not found: nope.png"),
    ("chat-not-a-number", "chat.py --model {fx}/export --temperature hot hi", 2,
     r"argument --temperature: invalid float value: 'hot'"),
    ("web-model-missing", "web.py --model runs/nope", 2, r"^web.py: --model: runs/nope: no such directory \(relative to {cwd}\)"),
]
HELP = ["train.py", "eval.py", "convert.py from-mgm", "convert.py from-llava", "convert.py to-llava-hf",
        "data.py check", "model.py merge", "bench.py data", "bench.py index", "bench.py padding", "bench.py mining",
        "demo.py", "chat.py", "web.py"]
OTHER_RUNS = ("other_run", "other_run_no_lock")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny full export with an HR tower, its base checkpoints, a recipe, questions, a directory that is none of
    these, and two directories holding another run (one with its train.lock naming its owner, one without)."""
    from transformers import AutoTokenizer

    from tests.tiny_models import build, save_tiny_checkpoints, save_tiny_tokenizer
    root = tmp_path_factory.mktemp("cli")
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tokenizer"))
    args = save_tiny_checkpoints(root, tokenizer=tok)
    build(root, tok).save_pretrained(root / "export", tok)
    (root / "q.jsonl").write_text(json.dumps({"id": "1", "conversations": [
        {"from": "human", "value": "what color"}, {"from": "gpt", "value": "red"}]}) + "\n")
    recipe = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    recipe.update(data_path=str(root / "q.jsonl"), image_folder=str(root), template="plain", stage="pretrain",
                  report_to="none", num_workers=0, output_dir=str(root / "run"))
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    (root / "not_an_export").mkdir()
    (root / "not_an_export" / "notes.txt").write_text("not a checkpoint")
    for name in OTHER_RUNS:
        run = root / name
        (run / "checkpoint-000002").mkdir(parents=True)
        (run / "checkpoint-000002" / "trainable_0.safetensors").write_bytes(b"weights")
        (run / "run.json").write_text('{"id": "other", "settings": {}}')
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        if name == "other_run":
            (run / "train.lock").write_text("pid 4242 on elsewhere\n")
    return root


@pytest.fixture(scope="module")
def results(fx, tmp_path_factory):
    """{case id: (status, stdout, stderr)} for every mistake and every --help, and the other runs' digests before."""
    cwd = tmp_path_factory.mktemp("cwd")
    cases = [dict(argv=line.format(fx=fx, cwd=cwd).split(), cwd=str(cwd)) for _, line, _, _ in MISTAKES]
    cases += [dict(argv=[*line.split(), "--help"], cwd=str(cwd), env={"COLUMNS": "1000"}) for line in HELP]
    (cwd / "cases.json").write_text(json.dumps(cases))
    before = {name: digest(fx / name) for name in OTHER_RUNS}
    subprocess.run([sys.executable, str(REPO / "tests" / "run_commands.py"), str(cwd / "cases.json"),
                    str(cwd / "results.json")], check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ran = json.loads((cwd / "results.json").read_text())
    ids = [case_id for case_id, *_ in MISTAKES] + HELP
    return {"cwd": cwd, "before": before, **{i: (r["status"], r["stdout"], r["stderr"]) for i, r in zip(ids, ran)}}


@pytest.mark.parametrize("case_id,line,status,says", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_users_mistake_is_one_line_naming_it(results, fx, case_id, line, status, says):
    got, stdout, stderr = results[case_id]
    command = line.split()[0]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert got == status, stderr[-3000:]
    said = [s for s in stderr.splitlines() if s.startswith(f"{command}: ")]
    assert len(said) == 1, stderr[-3000:]
    assert re.search(says.format(fx=re.escape(str(fx)), cwd=re.escape(str(results["cwd"]))), said[0]), said[0]


def test_a_refused_start_leaves_the_other_run_as_it_was(results, fx):
    """Before the fix, the refused process wrote its own pid into the other run's train.lock."""
    for name in OTHER_RUNS:
        assert digest(fx / name) == results["before"][name]
    assert not (fx / "other_run_no_lock" / "train.lock").exists()


@pytest.mark.parametrize("command", HELP)
def test_every_option_of_every_command_is_explained(results, command):
    status, stdout, _ = results[command]
    helps = option_helps(stdout)
    assert status == 0 and len(helps) >= 2, stdout
    assert all(helps.values()), {option: text for option, text in helps.items() if not text}


def test_train_help_explains_every_setting_with_its_comment_default_and_range(results):
    """The help of a setting is the comment beside its field: one text, never two to keep in step."""
    import data
    import model
    import settings
    helps = option_helps(results["train.py"][1])
    for cls in (model.ModelArguments, data.DataArguments, settings.TrainArguments):
        comments = cli.field_comments(cls)
        for field in dataclasses.fields(cls):
            assert comments[field.name], f"{cls.__name__}.{field.name} has no comment beside it"
            assert helps[f"--{field.name}"].startswith(" ".join(comments[field.name].split())), field.name
            assert re.search(r"\((default: .*|required)\)$", helps[f"--{field.name}"]), field.name
    assert helps["--stage"].endswith("(default: finetune; allowed: pretrain | finetune | dpo)")
    assert re.search(r"^model \(model.py ModelArguments\):$.*^data \(data.py DataArguments\):$.*^training "
                     r"\(settings.py TrainArguments\):$", results["train.py"][1], re.M | re.S)


def test_field_comments_are_read_from_the_source():
    @dataclass
    class Settings:
        path: str = "a#b"      # where it is: "#" inside the default is no comment
        # A heading, part of no field.
        size: int = 3          # how big
        #   (a continued line)
        plain: bool = False
        long_default: str = "x"
        #   its comment, below: the line had no room
    assert cli.field_comments(Settings) == {"path": 'where it is: "#" inside the default is no comment',
                                           "size": "how big (a continued line)", "plain": "",
                                           "long_default": "its comment, below: the line had no room"}


def option_helps(text: str) -> dict[str, str]:
    """{option or positional: its help} from argparse's --help output (printed with COLUMNS=1000, so unwrapped):
    an entry is a line indented by two spaces; its help follows on the same line or on the next, indented deeper."""
    helps, entry = {}, None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            name, _, rest = line.strip().partition("  ")
            entry = name.split()[0].rstrip(",")
            helps[entry] = rest.strip()
        elif entry and re.match(r"^ {4,}\S", line) and not helps[entry]:
            helps[entry] = line.strip()
        else:
            entry = None
    helps.pop("-h", None)
    return helps


def digest(directory: Path) -> str:
    """Names and bytes of every file under `directory`."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()
