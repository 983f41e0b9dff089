"""What every command shares: a user's mistake is one line on stderr and a non-zero exit, never a traceback;
every setting is explained by --help.

    from cli import UserError, run
    ...
        raise UserError(f"--data: {path} does not exist (relative to {os.getcwd()})")
    ...
    if __name__ == "__main__":
        run(main, "eval.py")      # prints "eval.py: --data: ... does not exist ..." and exits with status 2

A UserError is something the user can fix (a path, a setting, a refused conversion); anything else is a bug of ours
and keeps its traceback. ArgumentParser turns argparse's usage errors into UserErrors too. Settings held in a
dataclass become options with add_settings: the comment beside each field in the source is its --help, so the
two never drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown option, missing or malformed value) are UserErrors: one line, status 2,
    instead of the usage block with the error at its end. Its sub-command parsers are of this class too.
    A description or epilog keeps its own line breaks (examples stay one per line); option help is wrapped."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class",
                          lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=36))
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} ({self.prog} --help lists the options)")


# ---- Paths a user names ---------------------------------------------------------------------------------------------

def check_path(path: str, option: str, kind: str = "file") -> None:
    """`path` exists and is a file (kind="file") or a directory (kind="dir"); else a UserError naming `option`."""
    name = f"{option}: {path}" if option else str(path)
    if not os.path.exists(path):
        raise UserError(f"{name}: no such {'directory' if kind == 'dir' else 'file'}{relative(path)}")
    if kind == "dir" and not os.path.isdir(path):
        raise UserError(f"{name} is a file, not a directory")
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{name} is a directory, not a file")


def check_new_dir(path: str, option: str) -> None:
    """An output directory that holds nothing yet (absent or empty): writing into another one would mix files."""
    if os.path.isfile(path):
        raise UserError(f"{option}: {path} is a file; name a new directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"{option}: {path} already holds files; name a new (or empty) directory, nothing is "
                        "overwritten")


def relative(path: str) -> str:
    """" (relative to <cwd>)" for a relative path: where it was looked for."""
    return "" if os.path.isabs(os.path.expanduser(path)) else f" (relative to {os.getcwd()})"


# ---- Numbers a user types -------------------------------------------------------------------------------------------

def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value
    return convert


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1]")
    return value


# ---- Settings held in dataclasses -----------------------------------------------------------------------------------

METAVARS = {str: "TEXT", int: "INT", float: "FLOAT"}


def add_settings(parser: argparse.ArgumentParser, cls, title: str, allowed: dict[str, str] | None = None) -> None:
    """One --option per field of the dataclass `cls`, in a help group `title`. Each option's help is the comment
    beside the field in the source (field_comments), then its default and, from `allowed`, its allowed values.
    Booleans take true/false (or nothing: true); an optional field (X | None) also takes none."""
    group = parser.add_argument_group(title)
    comments, hints, allowed = field_comments(cls), typing.get_type_hints(cls), allowed or {}
    for f in dataclasses.fields(cls):
        kind, optional = value_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        facts = ["required"] if required else [f"default: {show(default)}"]
        facts += [f"allowed: {allowed[f.name]}"] if f.name in allowed else []
        help_text = f"{comments.get(f.name, '')} ({'; '.join(facts)})".replace("%", "%%")
        convert = parse_bool if kind is bool else kind
        if optional:
            convert = optional_value(convert)
        extra = dict(nargs="?", const=True, metavar="true|false") if kind is bool else dict(metavar=METAVARS[kind])
        group.add_argument(f"--{f.name}", type=convert, default=default, required=required, help=help_text, **extra)


def settings_from(namespace: argparse.Namespace, cls):
    """The instance of dataclass `cls` held by the options add_settings made."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def field_comments(cls) -> dict[str, str]:
    """{field name: the comment beside it} from the source of dataclass `cls`. Comment lines right below a field
    that are indented past their "#" ("#   ...") continue its comment (or hold it, when its line has no room);
    other comment lines are headings, part of no field."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    field = last = None            # the field whose line this is; the field whose comment may continue
    continues_at, line_start = -1, True
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline):
        kind, line = token.type, token.start[0]
        if kind == tokenize.NAME and line_start and token.string in names and token.string not in comments:
            field = token.string
            comments[field] = ""
        elif kind == tokenize.COMMENT:
            text = token.string[1:]
            if field is not None:
                comments[field] = text.strip()
            elif last is not None and line == continues_at and text.startswith("  "):
                comments[last] = f"{comments[last]} {text.strip()}".strip()
                continues_at += 1
            else:
                last = None
        elif kind == tokenize.NEWLINE and field is not None:
            field, last, continues_at = None, field, line + 1
        line_start = kind in (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL)
    return comments


def value_type(hint) -> tuple[type, bool]:
    """(str | int | float | bool, whether None is allowed) for a field's type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def optional_value(convert):
    """convert, with "none" / "null" meaning None (a recipe's `null`)."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def show(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else \
        '""' if value == "" else str(value)
