"""README.md and docs/*.md say what exists: every command of their fenced blocks names scripts, sub-commands,
recipes, accelerate configs, requirement files, make targets and --settings that are there, every recipe it names
holds only real settings, and every link leads to a file (and heading) that is there.

A command's options are checked against the script's own --help (run as a process, as a user would, forked from
one interpreter: tests/run_commands.py), so a renamed setting or sub-command fails here, not in a user's shell. The
commands are not run: they name real models and data (MGM-7B, your records) that tests never download."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from tests.test_cli import option_helps

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
STARTS = ("python", "python3", "accelerate", "make", "pip", "hf", "sbatch", "source")
USER_PATHS = ("runs/", "data/", "ckpt/", "demo_data/", "images/", "results/", "/")   # what the user makes or has


def commands(document: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every command in the document's shell blocks: continuation lines joined, comments
    dropped, `a && b` split; lines that are not commands (output shown in a block) are left out."""
    found, block, language = [], None, None
    lines = document.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            block, language = (None, None) if block is not None else ([], fence.group(1))
            continue
        if block is None or language not in SHELL_LANGUAGES:
            continue
        if block and block[-1][1].endswith("\\"):
            block[-1] = (block[-1][0], block[-1][1][:-1] + " " + line.strip())
        else:
            block.append((number, line.strip()))
        if not line.rstrip().endswith("\\"):
            start, text = block[-1]
            for part in re.split(r"\s*&&\s*", text):
                words = [w for w in part.split() if not re.match(r"^[A-Z_]+=", w)]
                if not words or words[0] not in STARTS:
                    continue                                   # output shown in the block, not a command
                argv = shlex.split(part, comments=True)
                while argv and re.match(r"^[A-Z_]+=", argv[0]):       # ENV=value command ...
                    argv = argv[1:]
                if argv and argv[0] in STARTS:
                    found.append((start, argv))
    return found


ALL = [(doc, number, argv) for doc in DOCUMENTS for number, argv in commands(doc)]
IDS = [f"{doc.relative_to(REPO)}:{number}" for doc, number, _ in ALL]


def test_readme_leads_to_a_finetune_within_its_first_screens():
    """The issue's reader: what it is, install, then finetuning on their own data, early; the rest in docs/."""
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    first = "\n".join(lines[:80])
    for needed in ("arxiv.org/abs/2403.18814", "github.com/dvlab-research/MGM", "make install",
                   "source .venv/bin/activate", "convert.py from-mgm", "hf download", "data.py check",
                   "accelerate_configs/single_gpu.yaml", "accelerate_configs/deepspeed_zero3.yaml",
                   "model.py merge", "eval.py", "chat.py", "web.py"):
        assert needed in first, needed
    assert "huggingface-cli" not in text and "## Glossary" in text
    assert len(ALL) > 40          # the documents' commands were found


@pytest.mark.parametrize("doc,number,argv", ALL, ids=IDS)
def test_every_command_names_what_exists(doc, number, argv, helps):
    where = f"{doc.relative_to(REPO)}:{number}: {shlex.join(argv)}"
    if script_args(argv) is not None:
        check_python(script_args(argv), helps, where)
    if argv[0] == "accelerate":
        assert argv[1] == "launch", where
        if "--config_file" in argv:
            config = argv[argv.index("--config_file") + 1]
            assert (REPO / config).is_file(), f"{where}: no {config}"
    elif argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        for target in (a for a in argv[1:] if "=" not in a):
            assert target in targets, f"{where}: no make target {target}"
    elif argv[0] == "pip":
        for i, arg in enumerate(argv):
            if argv[i - 1] == "-r":
                assert (REPO / arg).is_file(), f"{where}: no {arg}"
    elif argv[0] == "sbatch":
        script = next(a for a in argv if a.endswith(".sbatch"))
        assert (REPO / script).is_file(), where
        config = argv[argv.index(script) + 2]
        assert (REPO / config).is_file(), f"{where}: no {config}"
    elif argv[0] == "hf":
        assert argv[1] in ("download", "auth"), where
    for arg in argv[1:]:
        check_repo_path(arg, where)


def test_every_link_leads_somewhere():
    for doc in [*DOCUMENTS, REPO / "ARCHITECTURE.md", REPO / "accelerate_configs" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.relative_to(REPO)}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in headings(file), f"{doc.relative_to(REPO)}: link to {target}: no such heading"


def test_the_demo_prints_a_chat_command_that_runs_in_a_fresh_shell():
    """make demo ends with `<python> chat.py ...`: the interpreter that ran it, reachable from the repository
    without activating anything (.venv/bin/python under make demo)."""
    import demo
    shown = demo.python_shown()
    path = Path(shown) if os.path.isabs(shown) else REPO / shown
    assert os.access(path, os.X_OK), shown
    assert shown == os.path.relpath(sys.executable, REPO) or os.path.isabs(shown)


# ---- helpers ----------------------------------------------------------------------------------------------------

SUBCOMMANDS = {"convert.py", "data.py", "model.py", "bench.py"}


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """{"script" or "script sub": (its options, its sub-commands)} from --help of every script and sub-command the
    documents run."""
    wanted = set()
    for _, _, argv in ALL:
        rest = script_args(argv)
        if rest and rest[0].endswith(".py"):
            wanted.add(rest[0])
            if rest[0] in SUBCOMMANDS and len(rest) > 1 and not rest[1].startswith("-"):
                wanted.add(f"{rest[0]} {rest[1]}")
    wanted.add("train.py")
    names = sorted(w for w in wanted if (REPO / w.split()[0]).is_file())
    cwd = tmp_path_factory.mktemp("readme")
    cases = [dict(argv=[*name.split(), "--help"], cwd=str(cwd), env={"COLUMNS": "1000"}) for name in names]
    (cwd / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(REPO / "tests" / "run_commands.py"), str(cwd / "cases.json"),
                    str(cwd / "results.json")], check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    found = {}
    for name, result in zip(names, json.loads((cwd / "results.json").read_text())):
        usage = re.search(r"^usage: \S+ \[-h\] \{([\w,-]+)\}", result["stdout"], re.M)
        found[name] = (set(option_helps(result["stdout"])) if result["status"] == 0 else None,
                       set(usage.group(1).split(",")) if usage else set())
    return found


def script_args(argv: list[str]) -> list[str] | None:
    """The `script.py [arguments]` part of a command that runs one of ours (python, accelerate launch, the SLURM
    script's recipe and settings), or None."""
    if argv[0] in ("python", "python3"):
        return argv[1:] if argv[1:2] != ["-m"] or argv[2:3] == ["lmms_eval"] else None
    if argv[0] == "accelerate":
        rest = argv[2:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[2:]                              # accelerate's own --option value pairs
        return rest
    if argv[0] == "sbatch":
        script = next(a for a in argv if a.endswith(".sbatch"))
        recipe, _config, *settings = argv[argv.index(script) + 1:]
        return ["train.py", recipe, *settings]
    return None


def check_python(args: list[str], helps: dict, where: str) -> None:
    """`script.py [sub-command] [arguments]`: the script is there, the sub-command is one of its own, and each
    --option is one its --help lists (train.py: a setting; a recipe it names holds only settings)."""
    if args[:2] == ["-m", "lmms_eval"] or args[:1] == ["-m"]:
        return                                        # another project's command line
    script, rest = args[0], args[1:]
    assert (REPO / script).is_file(), f"{where}: no {script}"
    options, subcommands = helps[script]
    if subcommands:
        assert rest and rest[0] in subcommands, f"{where}: {script} has no sub-command {rest[:1]}"
        options, _ = helps[f"{script} {rest[0]}"]
        rest = rest[1:]
    assert options is not None, f"{where}: {script} --help failed"
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{where}: {script} has no option {arg}"
    if script == "train.py" and rest and rest[0].endswith((".yaml", ".yml")) and not rest[0].startswith(USER_PATHS):
        assert (REPO / rest[0]).is_file(), f"{where}: no recipe {rest[0]}"
        recipe = yaml.safe_load((REPO / rest[0]).read_text())
        unknown = sorted(f"--{key}" for key in recipe if f"--{key}" not in options)
        assert not unknown, f"{where}: {rest[0]} holds settings train.py does not know: {unknown}"


def check_repo_path(arg: str, where: str) -> None:
    """A file of this repository named in a command (recipes/..., accelerate_configs/..., a script, a requirements
    file) is there; paths a user makes or brings (runs/, data/, ckpt/, ...) are not checked."""
    value = arg.split("=", 1)[-1] if arg.startswith("--") else arg
    if value.startswith(USER_PATHS) or "..." in value:
        return
    if value.startswith(("recipes/", "accelerate_configs/", "slurm/", "docs/", "tests/")) or \
            re.fullmatch(r"[\w-]+\.(py|txt|sbatch)", value):
        assert (REPO / value).exists(), f"{where}: no {value}"


def headings(document: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    anchors, in_code = set(), False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors
