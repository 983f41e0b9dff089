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
    ("data-check-anyres-pinpoints", "data.py check {fx}/q.jsonl --tokenizer {fx}/tokenizer --template plain "
     "--image_grid_pinpoints 40x40", 2, r"^data.py: --image_grid_pinpoints '40x40': every side must be a positive "
     r"multiple of the tower's image size 336$"),
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
        "convert.py from-llava-next", "convert.py to-llava-next",
        "data.py check", "model.py merge", "bench.py data", "bench.py index", "bench.py padding", "bench.py splice",
        "bench.py mining", "bench.py train", "bench.py stop", "bench.py plan", "bench.py dpo", "bench.py anyres",
        "demo.py", "chat.py", "web.py"]
GROUPS = ["convert.py", "data.py", "model.py", "bench.py"]    # commands of sub-commands: the list, then examples
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
    cases += [dict(argv=[*line.split(), "--help"], cwd=str(cwd), env={"COLUMNS": "1000"}) for line in HELP + GROUPS]
    (cwd / "cases.json").write_text(json.dumps(cases))
    before = {name: digest(fx / name) for name in OTHER_RUNS}
    subprocess.run([sys.executable, str(REPO / "tests" / "run_commands.py"), str(cwd / "cases.json"),
                    str(cwd / "results.json")], check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ran = json.loads((cwd / "results.json").read_text())
    ids = [case_id for case_id, *_ in MISTAKES] + HELP + GROUPS
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
    assert status == 0 and helps, stdout
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
    assert re.search(r"\(default: finetune; allowed: pretrain \| finetune.*\)$", helps["--stage"])
    assert re.search(r"^model: .*:$.*^data: .*:$.*^training: .*:$", results["train.py"][1], re.M | re.S)


def test_attention_help_lists_every_value_it_allows(results):
    """The comment once said "sdpa or eager, or mmca" while seven values were allowed: the list comes from the range
    check itself."""
    import settings
    from model import ModelArguments
    (allowed,) = [rule for name, _, _, rule in settings.setting_ranges(ModelArguments(), settings.TrainArguments())
                  if name == "attention"]
    assert {"eager", "sdpa", "mmca", "flash_attention_2"} <= set(allowed.split(" | "))
    assert option_helps(results["train.py"][1])["--attention"].endswith(f"allowed: {allowed})")


@pytest.mark.parametrize("command", HELP + GROUPS)
def test_every_help_gives_an_example(results, command):
    """An example line a user can copy: indented, starting with python / accelerate launch / make, naming the
    command (and its sub-command)."""
    status, stdout, _ = results[command]
    assert status == 0, stdout
    examples = [line for line in stdout.splitlines() if re.match(r"^\s+(python|accelerate launch|make) ", line)]
    name = "make demo" if command == "demo.py" else command
    assert any(name in line or command in line for line in examples), stdout


@pytest.mark.parametrize("command", HELP + GROUPS)
def test_help_speaks_a_users_words_not_our_code_names(results, command):
    """No `module.name` of this repository (checkpoint.RESUMABLE, model.set_stage, ...), no class or constant of
    ours (StopRequests, PEAK_BF16_TFLOPS, ...), no `function()` call: --help is read by people who have not opened
    the code."""
    text = results[command][1]
    modules, names, functions = code_names()
    found = re.findall(rf"\b(?:{'|'.join(modules)})\.(\w+)", text)
    assert not [n for n in found if n in names | functions], found
    assert not [w for w in re.findall(r"\b\w+\b", text) if w in names], text
    assert not [f for f in re.findall(r"\b(\w+)\(\)", text) if f in functions], text


def test_every_sub_command_has_its_help_checked(results):
    """A new sub-command (convert.py from-llava-next, ...) joins HELP, and so its description, example and option
    helps are checked too."""
    for group in GROUPS:
        listed = re.search(r"^usage: \S+ \[-h\] \{([\w,-]+)\}", results[group][1], re.M).group(1).split(",")
        assert [f"{group} {sub}" for sub in listed if f"{group} {sub}" not in HELP] == []


def test_chat_help_lists_its_commands_and_sampling_defaults(results):
    stdout = results["chat.py"][1]
    for command in ("/image PATH", "/clear", "/exit"):
        assert re.search(rf"^\s+{command}\s+\S", stdout, re.M), command
    helps = option_helps(stdout)
    for option, default in (("--temperature", "0.0"), ("--top_p", "1.0"), ("--max_new_tokens", "64"),
                            ("--seed", "none")):
        assert f"default: {default}" in helps[option], option


def test_web_help_says_where_it_listens_and_what_it_needs(results):
    stdout = results["web.py"][1]
    assert "127.0.0.1" in option_helps(stdout)["--host"] and "no login" in stdout
    assert "requirements-web.txt" in stdout and "make web" in stdout


@pytest.mark.parametrize("command,kind", [("convert.py from-mgm", "a full export"),
                                          ("convert.py from-mgm", "a pretrain export"),
                                          ("convert.py from-llava", "a full export"),
                                          ("convert.py to-llava-hf", "transformers Llava directory")])
def test_convert_help_says_which_export_each_command_gives(results, command, kind):
    assert kind in " ".join(results[command][1].split())


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


def code_names() -> tuple[list[str], set[str], set[str]]:
    """(the repository's modules, their top-level classes and constants, their top-level functions), from the
    sources: what a user of the commands never needs to know by name."""
    import ast
    modules, names, functions = [], set(), set()
    for path in sorted(REPO.glob("*.py")):
        modules.append(path.stem)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper() and
                             len(t.id) > 3)
    return modules, names, functions


def option_helps(text: str) -> dict[str, str]:
    """{option or positional: its help} from argparse's --help output (printed with COLUMNS=1000, so unwrapped):
    an entry is a line indented by two spaces, from the first argument section to the examples after them (the
    description above them has indented lines too); its help follows on the same line or on the next, indented
    deeper."""
    helps, entry, arguments = {}, None, False
    for line in text.splitlines():
        if line in ("positional arguments:", "options:"):
            arguments = True
        elif re.match(r"^examples?:$", line):
            arguments = False
        if arguments and re.match(r"^  \S", line):
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
