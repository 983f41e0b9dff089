"""chat.py: a conversation whose every prompt is data.tokenize_prompt of the whole history, its commands, the
length rule, and the one-shot form (a single question's greedy answer is eval.py's)."""
import io
import sys

import pytest
from PIL import Image

import chat
from cli import run
from data import tokenize_prompt
from eval import Answerer, load_for_inference
from model import MiniGemini

COLOR, SHAPE = "what color is the shape ?", "what shape is this ?"


@pytest.fixture(scope="module")
def answerer(tiny_export):
    return Answerer(*load_for_inference(str(tiny_export), device="cpu"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


@pytest.fixture
def prompts(monkeypatch):
    """The prompt ids (and image count) of every answer generated: what the model was given."""
    seen, stream = [], MiniGemini.stream

    def recording(model, input_ids, images=None, *args, **kw):
        seen.append((input_ids.flatten().tolist(), 0 if images is None else len(images)))
        return stream(model, input_ids, images, *args, **kw)
    monkeypatch.setattr(MiniGemini, "stream", recording)
    return seen


def talk(monkeypatch, capsys, export, lines, *options):
    """chat.py in conversation mode, its stdin `lines` -> (answers printed, notices printed)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat.main(["--model", str(export), "--max_new_tokens", "4", *options])
    out, err = capsys.readouterr()
    return out.splitlines(), err


def ids(answerer, messages, num_images):
    return tokenize_prompt(messages, answerer.tokenizer, answerer.template, num_images=num_images).tolist()


def test_each_prompt_is_the_whole_conversation_and_clear_starts_over(tiny_export, answerer, image, prompts,
                                                                     monkeypatch, capsys):
    answers, notices = talk(monkeypatch, capsys, tiny_export,
                            [f"/image {image}", COLOR, SHAPE, "/clear", f"/image {image}", COLOR, "/exit", SHAPE])
    assert len(answers) == 3 and all(answers), answers        # nothing after /exit is asked
    first = [{"role": "user", "content": f"<image>\n{COLOR}"}]
    assert prompts[0] == (ids(answerer, first, 1), 1)
    history = first + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": SHAPE}]
    assert prompts[1] == (ids(answerer, history, 1), 1)      # the second question sees the first turn and its image
    assert prompts[2] == prompts[0] and answers[2] == answers[0]   # after /clear: a new conversation
    assert "(new conversation)" in notices


def test_a_missing_image_is_reported_and_the_conversation_goes_on(tiny_export, answerer, tmp_path, prompts,
                                                                  monkeypatch, capsys):
    answers, notices = talk(monkeypatch, capsys, tiny_export, [f"/image {tmp_path / 'missing.png'}", COLOR, "/image"])
    assert f"(/image: image not found: {tmp_path / 'missing.png'})" in notices
    assert "(/image: give the image's path: /image PATH)" in notices
    assert len(answers) == 1 and prompts == [(ids(answerer, [{"role": "user", "content": COLOR}], 0), 0)]


def test_the_oldest_turns_make_room_and_a_question_too_long_alone_is_refused(answerer, image, prompts):
    conversation = chat.Conversation(answerer)
    for question, images in ((COLOR, [Image.open(image)]), (SHAPE, [])):
        assert conversation.ask(question, images, max_new_tokens=4) == []
        assert "".join(conversation.reply(max_new_tokens=4)) == conversation.turns[-1].answer != ""
    first, second = conversation.turns
    third = chat.Turn("is it red ?")
    conversation.max_length = conversation.length([second, third]) + 4     # room for the last two turns only
    assert conversation.ask("is it red ?", [], max_new_tokens=4) == [first]
    assert conversation.turns[:1] == [second]
    assert len("".join(conversation.reply(max_new_tokens=4)).split()) <= 4
    assert prompts[-1][1] == 0 and len(prompts[-1][0]) + 4 <= conversation.max_length
    conversation.max_length = conversation.length([third])
    with pytest.raises(chat.TooLong, match="no room for an answer"):
        conversation.ask("is it red ?", [], max_new_tokens=4)
    assert len(conversation.turns) == 2                       # the refused question left the conversation as it was


def test_the_dropped_turns_are_announced(tiny_export, answerer, image, monkeypatch, capsys):
    conversation = chat.Conversation(answerer)
    limit = 4 + max(conversation.length([chat.Turn(COLOR, [Image.open(image)])]),
                    conversation.length([chat.Turn(SHAPE)]))
    answers, notices = talk(monkeypatch, capsys, tiny_export, [f"/image {image}", COLOR, SHAPE],
                            "--max_length", str(limit))    # each question fits alone, not both
    assert len(answers) == 2
    assert (f"(the conversation outgrew the model's length ({limit} positions): dropped the oldest 1 turn (with 1 "
            "image); /clear starts a new one)") in notices


def test_one_question_gets_evals_greedy_answer_and_sampling_repeats_with_a_seed(tiny_export, answerer, image,
                                                                              capsys):
    chat.main(["--model", str(tiny_export), "--image", str(image), "--max_new_tokens", "8", SHAPE])
    assert capsys.readouterr().out.strip() == answerer([SHAPE], [[Image.open(image)]], max_new_tokens=8)[0]
    sampled = []
    for seed in (3, 3, 4):
        chat.main(["--model", str(tiny_export), "--max_new_tokens", "8", "--temperature", "1.5", "--seed", str(seed),
                   SHAPE])
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/nowhere"], "chat.py: --model: {tmp}/nowhere: no such directory"),
    (["--model", "{tmp}"], "chat.py: --model: {tmp} is not a Mini-Gemini export (no mgm_config.json)"),
    (["--model", "{tmp}", "--top_p", "0"], "chat.py: --top_p must be in (0, 1], not 0.0"),
    (["--model", "{tmp}", "--image", "{tmp}/nope.png", "hi"], "chat.py: --image: image not found: {tmp}/nope.png"),
])
def test_user_mistakes_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        run(chat.main, "chat.py", [a.format(tmp=tmp_path) for a in args])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(message.format(tmp=tmp_path))
