"""Chat templates: how a conversation becomes text segments, each marked trainable or not.

A template is a value (`Template`), never global state. `template.segments(messages, tokenizer)` renders a whole
training conversation; `template.prompt_segments(messages, tokenizer)` renders an inference prompt that ends exactly
where the next assistant answer starts. `data.tokenize_conversation` tokenizes the segments one by one, so labels are
exact by construction: a segment is supervised or not as a whole, never recovered by counting tokens afterwards.

Segment rules that keep per-segment tokenization equal to tokenizing the whole text:
- a separator space goes at the START of the next segment (" USER:", " " + answer), never at the end of one;
- message content is `literal`: a special-token string inside it ("</s>", "<|eot_id|>") stays plain text;
- the end-of-turn marker after an answer is trainable, so the model learns to stop (with the newline that follows
  it in gemma/chatml: tokenizers without those special tokens would merge ">\n" into one token).

Messages come in LLaVA form ({"from": "human"|"gpt"|"system", "value"}) or chat form ({"role", "content"});
`normalize_messages` turns both into chat form and checks roles and turn order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# The ids that tokens and labels share with every room above this one (data, model, plan, train); data.py
# re-exports them.
IGNORE_INDEX = -100        # label value the loss ignores
IMAGE_TOKEN_INDEX = -200   # one placeholder id per image; the model splices the image features there
IMAGE_TAG = "<image>"      # where an image goes in a message's text

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class ConversationError(ValueError):
    """The conversation itself is unusable. `kind` is what data summaries count ("unknown role", "roles out of
    order", "empty reply", "malformed record", "template"); the message says exactly what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False   # part of an assistant reply (or its end-of-turn marker): supervised
    literal: bool = False     # message content: special-token strings inside it are plain text


@dataclass(frozen=True)
class Template:
    name: str
    render: Callable  # (messages, bos, eos, add_generation_prompt) -> list[Segment]; "auto" uses render_auto
    default_system: str = ""

    def segments(self, messages: list[dict], tokenizer) -> list[Segment]:
        """Segments of a full training conversation (it must end with an assistant reply)."""
        messages = self._with_system(normalize_messages(messages))
        if messages[-1]["role"] != "assistant":
            raise ConversationError("roles out of order", "the conversation must end with an assistant reply")
        return self._render(messages, tokenizer, add_generation_prompt=False)

    def prompt_segments(self, messages: list[dict], tokenizer) -> list[Segment]:
        """Segments of an inference prompt: all given turns (ending with a user turn) + the assistant header."""
        messages = self._with_system(normalize_messages(messages, for_prompt=True))
        return self._render(messages, tokenizer, add_generation_prompt=True)

    def _with_system(self, messages):
        if self.default_system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}] + messages
        return messages

    def _render(self, messages, tokenizer, add_generation_prompt):
        if self.name == "auto":
            return render_auto(messages, tokenizer, add_generation_prompt)
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        return [s for s in self.render(messages, bos, eos, add_generation_prompt) if s.text]


def get_template(name: str) -> Template:
    """The template called `name`; `auto` uses the tokenizer's own chat_template."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def normalize_messages(messages: list[dict], for_prompt: bool = False) -> list[dict]:
    """LLaVA or chat form -> [{"role", "content"}]: optional system first, then user/assistant alternating."""
    out = []
    for i, m in enumerate(messages):
        raw_role = m.get("from", m.get("role"))
        content = m.get("value", m.get("content"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ConversationError("unknown role", f"message {i}: unknown role {raw_role!r} "
                                    "(expected human/gpt/system or user/assistant/system)")
        if not isinstance(content, str):
            raise ConversationError("malformed record",
                                    f"message {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content.strip()})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    if not turns:
        raise ConversationError("roles out of order", "the conversation has no user/assistant turns")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError("roles out of order", f"turn {i}: expected a {expected} message, got {m['role']} "
                                    "(roles must alternate, starting with the user)")
        if m["role"] == "assistant" and not m["content"]:
            raise ConversationError("empty reply", f"turn {i}: empty assistant reply")
    if for_prompt and turns[-1]["role"] != "user":
        raise ConversationError("roles out of order", "an inference prompt must end with a user turn")
    return out


# ---- The templates ----------------------------------------------------------------------------------------------
# Each render function takes chat-form messages (system first if any) and returns segments in order.

def _split_system(messages):
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def render_plain(messages, bos, eos, add_generation_prompt):
    """Pretraining captions (LLaVA `plain`): the image alone is the prompt, the caption + eos is the target."""
    _, turns = _split_system(messages)
    image_tags = "<image>" * turns[0]["content"].count("<image>")
    segs = [Segment(image_tags, literal=True)]
    if not add_generation_prompt:
        segs += [Segment(turns[1]["content"], trainable=True, literal=True), Segment(eos, trainable=True)]
    return segs


def render_vicuna_v1(messages, bos, eos, add_generation_prompt):
    """"SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>" (FastChat vicuna_v1.1, LLaVA/MGM default)."""
    system, turns = _split_system(messages)
    segs = [Segment(system, literal=True)] if system else []
    for m in turns:
        if m["role"] == "user":
            sep = " " if segs and segs[-1].text != eos else ""
            segs += [Segment(sep + "USER:"), Segment(" " + m["content"], literal=True), Segment(" ASSISTANT:")]
        else:
            segs += [Segment(" " + m["content"], trainable=True, literal=True), Segment(eos, trainable=True)]
    return segs


def render_llama_2(messages, bos, eos, add_generation_prompt):
    """"<s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] q2 [/INST] a2 </s>" (Llama-2-chat)."""
    system, turns = _split_system(messages)
    segs = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            segs.append(Segment((bos if i else "") + "[INST]"))
            if i == 0 and system:
                segs += [Segment(" <<SYS>>\n"), Segment(system, literal=True), Segment("\n<</SYS>>\n\n"),
                         Segment(m["content"], literal=True)]
            else:
                segs.append(Segment(" " + m["content"], literal=True))
            segs.append(Segment(" [/INST]"))
        else:
            segs += [Segment(" " + m["content"], trainable=True, literal=True), Segment(" " + eos, trainable=True)]
    return segs


def render_mistral(messages, bos, eos, add_generation_prompt):
    """"<s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>" (Mistral-Instruct v0.1/v0.2; a system prompt is
    prepended to the first user message, as Mistral's own template does)."""
    system, turns = _split_system(messages)
    segs = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if (system and i == 0) else m["content"]
            segs += [Segment("[INST]"), Segment(" " + content, literal=True), Segment(" [/INST]")]
        else:
            segs += [Segment(" " + m["content"], trainable=True, literal=True), Segment(eos, trainable=True)]
    return segs


def render_llama_3(messages, bos, eos, add_generation_prompt):
    """"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nq<|eot_id|>..." (Llama-3 instruct)."""
    segs = []
    for m in messages:
        segs += [Segment(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"),
                 Segment(m["content"], trainable=m["role"] == "assistant", literal=True),
                 Segment("<|eot_id|>", trainable=m["role"] == "assistant")]
    if add_generation_prompt:
        segs.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n"))
    return segs


def render_gemma(messages, bos, eos, add_generation_prompt):
    """"<start_of_turn>user\\nq<end_of_turn>\\n<start_of_turn>model\\na<end_of_turn>\\n" (Gemma; the system prompt
    goes in front of the first user message, as Gemma's own template does)."""
    system, turns = _split_system(messages)
    segs = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if (system and i == 0) else m["content"]
            segs += [Segment("<start_of_turn>user\n"), Segment(content, literal=True),
                     Segment("<end_of_turn>\n<start_of_turn>model\n")]
        else:
            segs += [Segment(m["content"], trainable=True, literal=True), Segment("<end_of_turn>\n", trainable=True)]
    return segs


def render_chatml(messages, bos, eos, add_generation_prompt):
    """"<|im_start|>system\\nsys<|im_end|>\\n<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n"
    (Qwen, Yi, OpenHermes)."""
    segs = []
    for m in messages:
        assistant = m["role"] == "assistant"
        segs += [Segment(f"<|im_start|>{m['role']}\n"), Segment(m["content"], trainable=assistant, literal=True),
                 Segment("<|im_end|>\n", trainable=assistant)]
    if add_generation_prompt:
        segs.append(Segment("<|im_start|>assistant\n"))
    return segs


def render_auto(messages, tokenizer, add_generation_prompt):
    """Segments from the tokenizer's own `chat_template`, found by rendering growing prefixes of the conversation:
    the text a reply adds after the generation prompt is the trainable part. A template whose renders are not
    prefixes of each other (e.g. one that rewrites earlier turns) cannot give exact labels: that is an error."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError("template", "template 'auto' needs a tokenizer with a chat_template")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segs, done, start = [], "", 0   # `done`: text rendered so far; `start`: first message not yet in it
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConversationError("template", "the tokenizer's chat_template does not render a conversation as a "
                                    "prefix of its continuation; use a named template instead of 'auto'")
        segs += _split_content(prompt[len(done):], [x["content"] for x in messages[start:i]], trainable=False)
        segs += _split_content(full[len(prompt):], [m["content"]], trainable=True)
        done, start = full, i + 1
    if add_generation_prompt:
        prompt = render(messages, True)
        if not prompt.startswith(done):
            raise ConversationError("template",
                                    "the tokenizer's chat_template is not prefix-consistent; use a named template")
        segs += _split_content(prompt[len(done):], [x["content"] for x in messages[start:]], trainable=False)
    return [s for s in segs if s.text]


def _split_content(text: str, contents: list[str], trainable: bool) -> list[Segment]:
    """Mark the message contents inside a rendered chunk as literal, the rest as template markup."""
    segs, pos = [], 0
    for content in [c for c in contents if c]:
        at = text.find(content, pos)
        if at < 0:  # the template rewrote the message: its text cannot be told apart from markup
            raise ConversationError("template", "the tokenizer's chat_template changes message text (content not "
                                    "found in its render); use a named template instead of 'auto'")
        segs += [Segment(text[pos:at], trainable), Segment(content, trainable, literal=True)]
        pos = at + len(content)
    return segs + [Segment(text[pos:], trainable)]


TEMPLATES = {
    "plain": Template("plain", render_plain),
    "vicuna_v1": Template("vicuna_v1", render_vicuna_v1, default_system=VICUNA_SYSTEM),
    "llama_2": Template("llama_2", render_llama_2),
    "mistral": Template("mistral", render_mistral),
    "llama_3": Template("llama_3", render_llama_3),
    "gemma": Template("gemma", render_gemma),
    "chatml": Template("chatml", render_chatml),
    "auto": Template("auto", render_auto),
}
