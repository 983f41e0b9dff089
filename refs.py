"""What a user points at, checked before anything loads: local checkpoint directories, hub names, exports,
tokenizer directories. Every problem is one line naming the setting (a cli.UserError), never a loader's traceback
("Repo id must be in the form ...", a failed connection, sentencepiece asked for a missing vocabulary).

Used by train.py (settings.py), data.py's `check`, eval.py, convert.py and model.py's loaders; it imports nothing of
theirs, so every one of them can.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from huggingface_hub import is_offline_mode

from cli import UserError, check_path, relative

CONFIG_NAME = "mgm_config.json"           # an export's config: what makes a directory an export of this repo
MM_WEIGHTS = "mm_weights.safetensors"     # pretrain / LoRA exports: projector, mining, other non-LLM trainables
REF_SETTINGS = ("llm", "vision_tower", "vision_tower_aux")   # the base checkpoints an export refers to
TOKENIZER_VOCABULARY = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# What a local checkpoint must hold for each use (one of these files) and what it then is; the loaders read them.
CHECKPOINT_KINDS = {
    "llm": (("config.json",), "a transformers causal LM checkpoint"),
    "vision_tower": (("config.json",), "a transformers CLIP / SigLIP checkpoint"),
    "vision_tower_aux": (("open_clip_config.json", "config.json"), "an OpenCLIP or timm checkpoint"),
    "pretrained_mm_path": ((MM_WEIGHTS,), "a pretrain export"),
    "tokenizer": (TOKENIZER_VOCABULARY, "a tokenizer: copy the tokenizer files of the base LLM there"),
}


def is_local_path(ref: str) -> bool:
    """A reference that can only mean a local path: absolute, ./ ../ ~, or more than the one "/" of org/name."""
    return not ref.startswith("hf-hub:") and (ref.startswith(("/", ".", "~")) or ref.count("/") > 1)


def check_model_ref(ref: str | None, setting: str, context: str = "", kind: str | None = None) -> None:
    """A checkpoint reference is an existing local path holding what `kind` (default: the setting) needs, or a hub
    name; offline (HF_HUB_OFFLINE=1), one in the cache. Anything else is a UserError naming the setting, never the
    hub client's "Repo id must be in the form ..." or a failed connection."""
    if not ref:
        return
    kind = kind or setting
    files, what = CHECKPOINT_KINDS[kind]
    path = os.path.expanduser(ref)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name)) for name in files):
            raise UserError(f"{context}{setting}: {ref} holds no {' / '.join(files[:3])}, so it is not {what}")
    elif os.path.exists(path):
        if kind != "pretrained_mm_path":   # the one that may name its weights file itself
            raise UserError(f"{context}{setting}: {ref} is a file; name a checkpoint directory or a hub name")
    elif is_local_path(ref):
        raise UserError(f"{context}{setting}: {ref}: no such directory{relative(ref)}")
    elif setting == "vision_tower_aux" and "/" not in ref:
        return      # a timm / OpenCLIP architecture name: timm resolves it
    elif not in_hub_cache(ref.removeprefix("hf-hub:")):
        problem = "not a hub name in the cache (HF_HUB_OFFLINE=1)" if is_offline_mode() else \
            hub_problem(ref.removeprefix("hf-hub:"))
        if problem:
            raise UserError(f"{context}{setting}: {ref}: no such directory{relative(ref)}, and {problem}")


@functools.lru_cache(maxsize=None)
def hub_problem(name: str) -> str | None:
    """Why the Hugging Face hub cannot give the model `name`, which is not in the cache: no connection, or no such
    model; None when it can (or answers with anything else, left to the loader). Asked once, before anything loads,
    so that a misspelt name or a machine without internet stops the run with one line, not a loader's traceback."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    try:
        HfApi().model_info(name, timeout=30)     # HF_ENDPOINT (a mirror) as the loaders will use it
    except GatedRepoError:
        return None         # it exists; the loader says how to be granted access
    except RepositoryNotFoundError:
        return "no model of that name on the Hugging Face hub (a private one needs `hf auth login`)"
    except HfHubHTTPError:
        return None         # the hub answered (rate limit, server error, ...): the loader retries and says so
    except ValueError as e:  # huggingface_hub's HFValidationError
        return f"not a valid hub name ({e})"
    except Exception as e:  # noqa: BLE001 - the HTTP client's connection / DNS / timeout errors (its classes vary)
        return (f"the Hugging Face hub cannot be reached to download it ({type(e).__name__}: {e}); connect, or "
                "download it beforehand (`hf download NAME`) and set HF_HUB_OFFLINE=1")
    return None


def in_hub_cache(name: str) -> bool:
    """Whether the hub model `name` has a snapshot in the local Hugging Face cache (what offline loading reads)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    snapshots = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=name, repo_type="model"), "snapshots")
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_export(path, option: str = "") -> dict:
    """An export of this repo: its mgm_config.json; anything else is a UserError naming `option`."""
    check_path(str(path), option, "dir")
    config = Path(path, CONFIG_NAME)
    if not config.exists():
        raise UserError(f"{option + ': ' if option else ''}{path} is not a Mini-Gemini export (no {CONFIG_NAME}): "
                        "train.py writes one to <output_dir>/export, convert.py makes one from an MGM / LLaVA "
                        "checkpoint")
    return json.loads(config.read_text())


def portable_refs(args: dict) -> dict:
    """An export's base references as absolute paths where they are local, so it loads from any working
    directory; hub names stay as they are."""
    return {k: str(Path(v).expanduser().resolve()) if k in (*REF_SETTINGS, "init_from") and isinstance(v, str) and
            not v.startswith("hf-hub:") and os.path.exists(os.path.expanduser(v)) else v for k, v in args.items()}


def check_tokenizer_dir(path) -> None:
    """A local directory without tokenizer vocabulary fails naming it (transformers would ask for sentencepiece)."""
    check_model_ref(str(path), "tokenizer")
