"""`sharpen chat` (launcher/commands/chat.py): answers streamed as their tokens come and printed right, the
conversation kept and formatted with the chat template, its commands, Ctrl-C stopping one answer, in-process
(tests/ranks/test_chat.py runs it in a real terminal)."""

from __future__ import annotations

import io
import re
import signal
import sys

import pytest

from launcher.commands.chat import UNPRINTABLE, Chat, TextStream, end_of_turn, loop
from training.rollout.generate import SamplingSettings


@pytest.fixture(scope="module")
def source(tiny_model):
    from launcher.source import load_source

    return load_source(str(tiny_model), device="cpu")


def streamed(tokenizer, ids, stop=None):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push([i]) for i in ids]
    return pieces, stream.finish(), stream


# -- streaming text ------------------------------------------------------------------------------------


def test_streamed_pieces_spell_the_decoded_text_and_never_half_a_character(source):
    """Byte-level tokens split é, ö and 😀 across tokens: a piece is printed only once its character is
    whole, and the pieces together are the text."""
    tokenizer = source.tokenizer
    text = "héllo wörld 😀 ok ünïcode"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(1, len(ids)))  # a token ends mid-character
    pieces, rest, stream = streamed(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + rest == text == stream.text
    assert sum(1 for piece in pieces if piece) > 10  # printed as it came, not at the end


def test_a_stop_string_is_held_back_until_it_is_clearly_not_one(source):
    """Without a chat template the model's own "\\nUser:" ends its answer, and is never printed."""
    tokenizer = source.tokenizer
    ids = tokenizer("Sure.\nUsually yes.\nUser: and now", add_special_tokens=False)["input_ids"]
    pieces, rest, stream = streamed(tokenizer, ids, stop="\nUser:")
    assert "".join(pieces) + rest == "Sure.\nUsually yes." == stream.text
    assert stream.hit_stop


def test_an_answer_ends_at_the_templates_end_of_turn(source):
    """The tiny model's template closes a turn with its special <|end|>; chatml's <|im_end|> is plain text to
    this tokenizer, so it is a stop string; without a template the next "User:" line is."""
    from training.data.templates import load_chat_template

    tokenizer = source.tokenizer
    ids, stop = end_of_turn(tokenizer, source.chat_template)
    assert tokenizer.convert_ids_to_tokens(ids) == ["</s>", "<|end|>"] and stop is None
    ids, stop = end_of_turn(tokenizer, load_chat_template("chatml"))
    assert tokenizer.convert_ids_to_tokens(ids) == ["</s>"] and stop == "<|im_end|>"
    assert end_of_turn(tokenizer, None) == ([tokenizer.eos_token_id], "\nUser:")


# -- the conversation, in-process ----------------------------------------------------------------------


def chat_on(source, max_new_tokens=12, **kwargs) -> tuple[Chat, io.StringIO]:
    out = io.StringIO()
    return Chat(source, SamplingSettings(max_new_tokens), seed=0, out=out, **kwargs), out


def test_an_answer_is_printed_as_kept_and_the_conversation_grows(source):
    chat, out = chat_on(source, system="be brief")
    reply = chat.answer("hello")
    assert out.getvalue().endswith(" [cut at --max-new-tokens 12]\n")
    printed = out.getvalue().removesuffix(" [cut at --max-new-tokens 12]\n")
    assert len(reply) > 5 and printed.strip() == reply.translate(UNPRINTABLE)  # printed is what is kept
    assert chat.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}]
    text = source.tokenizer.decode(chat.prompt_ids(chat.conversation("and then?")))
    assert text == (f"<s><|system|>\nbe brief<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n{reply}<|end|>\n"
                    "<|user|>\nand then?<|end|>\n<|assistant|>\n")
    # The same seed and inputs give the same answer; the next answer is a new draw.
    again, _ = chat_on(source, system="be brief")
    assert again.answer("hello") == reply


def test_commands_reset_set_the_system_prompt_and_exit(source):
    chat, out = chat_on(source)
    chat.answer("hello")
    assert chat.handle("/system you are a pirate")
    assert chat.messages == [] and chat.system == "you are a pirate"
    assert chat.conversation("hi")[0] == {"role": "system", "content": "you are a pirate"}
    chat.answer("hello")
    assert chat.handle("/reset") and chat.messages == [] and chat.system == "you are a pirate"
    assert chat.handle("/system") and chat.system is None
    assert chat.handle("/frobnicate") and chat.handle("   ")
    assert not chat.handle("/exit")
    lines = out.getvalue().splitlines()
    assert lines.count('[conversation reset; system prompt: "you are a pirate"]') == 2  # /system, then /reset
    assert "[conversation reset; no system prompt]" in lines
    assert any(line.startswith("[unknown command /frobnicate] commands: /reset") for line in lines)


def test_ctrl_c_stops_one_answer_and_keeps_what_it_said(source):
    """SIGINT while the answer streams (sent by the process to itself after a few pieces): the decode stops
    at the next token, the partial answer is kept, marked [stopped], and the next answer comes whole."""
    chat, out = chat_on(source, max_new_tokens=500)
    writes = []

    class Interrupting(io.StringIO):
        def write(self, text):
            writes.append(text)
            if len(writes) == 5:
                signal.raise_signal(signal.SIGINT)
            return super().write(text)

    chat.out = Interrupting()
    reply = chat.answer("tell me a long story")
    assert chat.out.getvalue().endswith(" [stopped]\n")
    assert 0 < len(source.tokenizer(reply, add_special_tokens=False)["input_ids"]) < 20
    assert chat.messages[-1] == {"role": "assistant", "content": reply}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is the program's again
    chat.out, chat.settings = out, SamplingSettings(8)
    chat.answer("again")
    assert out.getvalue().endswith(" [cut at --max-new-tokens 8]\n") and len(chat.messages) == 4


def test_a_conversation_past_the_models_length_is_refused_with_a_hint(source):
    chat, out = chat_on(source)
    chat.max_positions = 10
    assert chat.answer("a question longer than ten tokens, surely, by some way") is None
    assert re.fullmatch(r"\[the conversation is \d+ tokens, the model's limit is 10: /reset\]\n", out.getvalue())
    assert chat.messages == []


def test_without_a_chat_template_the_conversation_is_plain_text(source):
    from dataclasses import replace

    chat, out = chat_on(replace(source, chat_template=None), system="be brief")
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = source.tokenizer.decode(chat.prompt_ids(chat.conversation("how are you?")))
    assert text == "<s>System: be brief\nUser: hi\nAssistant: hello\nUser: how are you?\nAssistant:"


def test_the_loop_ends_at_end_of_input(source, monkeypatch, capsys):
    chat, out = chat_on(source)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\n"))
    assert loop(chat) == 0
    assert "[conversation reset; no system prompt]" in out.getvalue()
