"""Chat templates and exact label masks, on real tokenizers (see conftest.py), for every template.

What must hold for every template, tokenizer and awkward conversation:
- the supervised tokens decode exactly to the assistant replies plus each reply's end-of-turn marker;
- for fast tokenizers, input_ids equal the tokenizer's own encoding of the whole rendered text;
- the inference prompt for turn k tokenizes to an exact prefix of the training ids, and the answer starts right after;
- `auto` agrees with `tokenizer.apply_chat_template`.
"""
import copy
import dataclasses

import pytest
import torch

from conversation import ConversationError, get_template, normalize_messages
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, BadSample, tokenize_conversation, tokenize_prompt

NAMED = ["plain", "vicuna_v1", "llama_2", "mistral", "llama_3", "gemma", "chatml"]
TOKENIZERS = ["llama_tokenizer", "llama_tokenizer_slow", "llama3_tokenizer", "chatml_tokenizer", "gemma_tokenizer"]

# Conversations with awkward text: unicode, newlines, role-header look-alikes and special-token strings inside
# answers, empty system prompt, leading/trailing spaces (templates strip content, as the official templates do).
AWKWARD = {
    "unicode_newlines": [
        {"from": "human", "value": "Über café?\nLine two\n\nand three"},
        {"from": "gpt", "value": "Naïve — “yes” 🙂\n- item 1\n- item 2"},
        {"from": "human", "value": "日本語で?"},
        {"from": "gpt", "value": "はい。42"},
    ],
    "header_lookalikes": [
        {"from": "human", "value": "Say USER: and ASSISTANT: please"},
        {"from": "gpt", "value": "USER: ASSISTANT: </s> [/INST] <|eot_id|> <end_of_turn> <|im_end|> done"},
        {"from": "human", "value": "</s>"},
        {"from": "gpt", "value": "<s>ok"},
    ],
    "empty_system_and_spaces": [
        {"from": "system", "value": ""},
        {"from": "human", "value": "   padded question   "},
        {"from": "gpt", "value": "  padded answer  "},
    ],
    "system_chat_form": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "5"},
    ],
}
# Which templates a tokenizer family is meant for: there, per-segment ids must equal a whole-text encode. Elsewhere
# (e.g. Llama-2 markup under Llama-3's byte-level BPE) a segment boundary may split what a whole-text encode would
# merge (".\n"); training and inference still agree, since both tokenize segment by segment.
APPLIES = {"llama_tokenizer": ["plain", "vicuna_v1", "llama_2", "mistral", "gemma", "chatml"],
           "llama3_tokenizer": ["plain", "vicuna_v1", "llama_3", "auto"],
           "chatml_tokenizer": ["chatml"], "gemma_tokenizer": ["gemma"]}
SPECIAL_LOOKALIKES = ("</s>", "<s>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


@pytest.fixture(scope="module")
def chatml_tokenizer(llama3_tokenizer):
    """A byte-level BPE tokenizer whose ChatML markers are special tokens, as in Qwen2."""
    tok = copy.deepcopy(llama3_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


@pytest.fixture(scope="module")
def gemma_tokenizer(llama3_tokenizer):
    """A byte-level BPE tokenizer whose turn markers are special tokens, as in Gemma."""
    tok = copy.deepcopy(llama3_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def end_marker(template: str, tok) -> str:
    return {"plain": tok.eos_token, "vicuna_v1": tok.eos_token, "llama_2": " " + tok.eos_token,
            "mistral": tok.eos_token, "llama_3": "<|eot_id|>", "gemma": "<end_of_turn>\n", "chatml": "<|im_end|>\n",
            "auto": "<|eot_id|>"}[template]


def cases():
    for tok_name in TOKENIZERS:
        templates = NAMED + (["auto"] if tok_name == "llama3_tokenizer" else [])
        for template in templates:
            for conv_name in AWKWARD:
                yield pytest.param(tok_name, template, conv_name, id=f"{tok_name}-{template}-{conv_name}")


def replies(conv):
    return [m["content"] if "content" in m else m["value"] for m in normalize_messages(conv) if m["role"] == "assistant"]


def decode(tok, ids):
    """tok.decode, except for the slow SentencePiece backend, whose decode leaves byte-fallback pieces (<0x0A>) as
    text: there the SentencePiece model itself decodes the text between special tokens."""
    ids = [int(i) for i in ids]
    if tok.is_fast:
        return tok.decode(ids)
    out, run = "", []
    for i in ids + [None]:
        if i is None or i in tok.all_special_ids:
            out += tok.sp_model.decode(run) if run else ""
            out += tok.convert_ids_to_tokens(i) if i is not None else ""
            run = []
        else:
            run.append(i)
    return out


def supervised_spans(sample):
    """Contiguous runs of supervised token ids."""
    spans, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("tok_name,template,conv_name", list(cases()))
def test_supervised_tokens_decode_to_replies_plus_end_marker(request, tok_name, template, conv_name):
    tok = request.getfixturevalue(tok_name)
    conv = AWKWARD[conv_name]
    if template == "plain":  # pretraining captions: one question, one caption
        conv = [m for m in conv if (m.get("from") or m.get("role")) != "system"][:2]
    sample = tokenize_conversation(conv, tok, template)
    spans = supervised_spans(sample)
    expected = [r.strip() + end_marker(template, tok) for r in replies(conv)]
    # SentencePiece decoders drop the one leading space of a decoded text; compare without leading spaces.
    assert [decode(tok, s).lstrip() for s in spans] == [e.lstrip() for e in expected]
    # A special-token string written inside a message is text, never the control token itself: the supervised
    # tokens hold the end-of-turn token exactly once per reply (where the template puts it).
    marker = end_marker(template, tok).strip()
    if marker in tok.all_special_tokens:
        supervised = sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()
        assert supervised.count(tok.convert_tokens_to_ids(marker)) == len(expected)


@pytest.mark.parametrize("tok_name,template,conv_name",
                         [c for c in cases() if c.values[1] in APPLIES.get(c.values[0], [])])
def test_fast_ids_equal_tokenizing_the_whole_text(request, tok_name, template, conv_name):
    tok = request.getfixturevalue(tok_name)
    conv = AWKWARD[conv_name]
    if template == "plain":
        conv = [m for m in conv if (m.get("from") or m.get("role")) != "system"][:2]
    if any(s in m.get("value", m.get("content")) for m in conv for s in SPECIAL_LOOKALIKES):
        pytest.skip("special-token strings in content are literal text here; a whole-text encode makes them control tokens")
    sample = tokenize_conversation(conv, tok, template)
    text = "".join(s.text for s in get_template(template).segments(conv, tok))
    own = tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]
    assert sample["input_ids"].tolist() == own


@pytest.mark.parametrize("tok_name,template,conv_name", [c for c in cases() if c.values[1] != "plain"])
def test_inference_prompt_is_a_prefix_of_the_training_ids(request, tok_name, template, conv_name):
    tok = request.getfixturevalue(tok_name)
    conv = AWKWARD[conv_name]
    train = tokenize_conversation(conv, tok, template)
    ids, labels = train["input_ids"].tolist(), train["labels"].tolist()
    assistant_at = [i for i, m in enumerate(normalize_messages(conv)) if m["role"] == "assistant"]
    for k, at in enumerate(assistant_at):
        prompt = tokenize_prompt(conv[:at], tok, template).tolist()
        assert ids[: len(prompt)] == prompt, f"turn {k}"
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX, f"turn {k}"


def test_plain_prompt_is_the_image_alone(llama_tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]
    train = tokenize_conversation(conv, llama_tokenizer, "plain")
    prompt = tokenize_prompt(conv[:1], llama_tokenizer, "plain")
    assert prompt.tolist() == [llama_tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert train["input_ids"][:2].tolist() == prompt.tolist()
    assert llama_tokenizer.decode(train["input_ids"][train["labels"] != IGNORE_INDEX]) == "a red circle</s>"


@pytest.mark.parametrize("conv_name", list(AWKWARD))
def test_auto_agrees_with_apply_chat_template(llama3_tokenizer, conv_name):
    conv = AWKWARD[conv_name]
    chat = normalize_messages(conv)
    if any(s in m["content"] for m in chat for s in SPECIAL_LOOKALIKES):
        pytest.skip("apply_chat_template turns special-token strings in content into control tokens; we keep them text")
    ours = tokenize_conversation(conv, llama3_tokenizer, "auto")["input_ids"].tolist()
    assert ours == list(llama3_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False))
    prompt = tokenize_prompt(conv[:-1], llama3_tokenizer, "auto").tolist()
    assert prompt == list(llama3_tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True,
                                                               return_dict=False))


def test_llama3_template_matches_the_official_chat_template_after_its_system_header(llama3_tokenizer):
    conv = AWKWARD["unicode_newlines"]
    ours = tokenize_conversation(conv, llama3_tokenizer, "llama_3")["input_ids"].tolist()
    official = tokenize_conversation(conv, llama3_tokenizer, "auto")["input_ids"].tolist()
    # The official template adds a dated system header; the rest (system prompt, turns) is token-for-token equal.
    assert ours[1:] == official[len(official) - len(ours) + 1:]


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral"])
def test_slow_and_fast_sentencepiece_give_the_same_ids(llama_tokenizer, llama_tokenizer_slow, template):
    """The same SentencePiece model, slow or fast: identical ids and labels after the BOS (the slow backend adds
    none). Not llama_2: its markup "<s>[INST]" sits inside one segment, and the legacy slow backend puts a "▁" after
    every special token inside a text ("<s>▁[INST]") where the fast one does not."""
    for conv in AWKWARD.values():
        fast = tokenize_conversation(conv, llama_tokenizer, template)
        slow = tokenize_conversation(conv, llama_tokenizer_slow, template)
        assert fast["input_ids"][0] == llama_tokenizer.bos_token_id
        assert torch.equal(fast["input_ids"][1:], slow["input_ids"]) and torch.equal(fast["labels"][1:], slow["labels"])


# ---- Images -----------------------------------------------------------------------------------------------------

def test_each_image_tag_is_one_placeholder_and_never_supervised(llama_tokenizer):
    conv = [{"from": "human", "value": "<image>\nCompare with <image> please."}, {"from": "gpt", "value": "Same."}]
    sample = tokenize_conversation(conv, llama_tokenizer, "vicuna_v1", num_images=2)
    ids, labels = sample["input_ids"], sample["labels"]
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 2
    assert (labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    assert llama_tokenizer.decode(ids[labels != IGNORE_INDEX]) == "Same.</s>"


def test_a_single_image_without_a_tag_gets_one_before_the_first_question(llama_tokenizer):
    conv = [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Red."}]
    tagged = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}]
    sample = tokenize_conversation(conv, llama_tokenizer, "vicuna_v1", num_images=1)
    assert torch.equal(sample["input_ids"], tokenize_conversation(tagged, llama_tokenizer, "vicuna_v1")["input_ids"])


def test_image_count_must_match_the_tags(llama_tokenizer):
    conv = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two."}]
    with pytest.raises(BadSample, match="2 <image> tags but 3 images"):
        tokenize_conversation(conv, llama_tokenizer, "vicuna_v1", num_images=3)


# ---- Truncation -------------------------------------------------------------------------------------------------

def test_max_length_counts_images_at_their_expanded_size(llama_tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle on grey."}]
    full = tokenize_conversation(conv, llama_tokenizer, "plain")
    n = len(full["input_ids"])
    cut = tokenize_conversation(conv, llama_tokenizer, "plain", max_length=n + 100 - 3, image_token_len=101)
    assert len(cut["input_ids"]) == n - 3 and (cut["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert torch.equal(cut["input_ids"], full["input_ids"][: n - 3])


def test_a_prompt_that_cannot_fit_is_a_bad_sample_with_a_reason(llama_tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle."}]
    with pytest.raises(BadSample, match="an image would be cut"):
        tokenize_conversation(conv, llama_tokenizer, "vicuna_v1", max_length=50, image_token_len=576)
    text_only = [{"from": "human", "value": "word " * 40}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(BadSample, match="nothing left to learn"):
        tokenize_conversation(text_only, llama_tokenizer, "vicuna_v1", max_length=20)


# ---- Bad conversations ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv,kind,reason", [
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "unknown role", "unknown role 'robot'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "roles out of order", "roles must alternate"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "roles out of order", "expected a user message"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "   "}], "empty reply", "empty assistant reply"),
    ([{"from": "human", "value": "a"}], "roles out of order", "must end with an assistant reply"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], "image/tag mismatch",
     "outside a user turn"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "malformed record", "content must be a string"),
])
def test_bad_conversations_raise_a_clear_reason_and_the_kind_summaries_count(llama_tokenizer, conv, kind, reason):
    with pytest.raises(BadSample, match=f"^{kind}: .*{reason}") as error:
        tokenize_conversation(conv, llama_tokenizer, "vicuna_v1")
    assert error.value.kind == kind


def test_templates_are_values_and_unknown_names_fail(llama_tokenizer):
    template = get_template("vicuna_v1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        template.default_system = "changed"          # no global state to mutate
    conv = AWKWARD["system_chat_form"]
    assert template.segments(conv, llama_tokenizer) == get_template("vicuna_v1").segments(conv, llama_tokenizer)
    with pytest.raises(KeyError, match="unknown template 'nope'"):
        get_template("nope")
    with pytest.raises(ConversationError, match="must end with a user turn"):
        normalize_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], for_prompt=True)
