"""`sharpen chat` in a real terminal (a pty, through pexpect): what a person at the keyboard sees; and on a
trained run dir. Here, not in tests/unit, because the process's start (torch, transformers) alone takes
several seconds, and the run is trained; the rest of chat is tested in-process by tests/unit/test_chat_cmd.py."""

from __future__ import annotations

import io
import os
import re
import sys
import time

import pexpect
from support.e2e import REPO

from launcher.commands.chat import Chat
from training.rollout.generate import SamplingSettings


def test_chat_in_a_terminal(tiny_model):
    """`sharpen chat` on a pty: the banner, an answer streamed before it has ended (Ctrl-C stops it), the
    prompt again, the commands, Ctrl-C at the prompt, another answer after the stop, /exit with status 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "launcher.cli", "chat", str(tiny_model), "--system", "be brief",
                                           "--max-new-tokens", "400"],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect(rf"sharpen chat: {re.escape(str(tiny_model))} \(model dir\) on cpu, fp32")
        child.expect("formatted with the model's chat template")
        child.expect("system: be brief")
        child.expect(r"commands: /reset .* /exit \(or Ctrl-D\)")
        child.expect_exact("> ")

        child.sendline("tell me a long story")
        child.expect_exact("tell me a long story")  # the terminal's echo
        seen = ""
        started = time.monotonic()
        while len(seen.strip()) < 20:  # the answer's first characters, while it is still being sampled
            seen += child.read_nonblocking(100, timeout=60)
        child.sendintr()
        child.expect_exact(" [stopped]", timeout=60)
        assert "[cut at" not in child.before  # stopped by Ctrl-C, not by running out of tokens
        assert time.monotonic() - started < 60
        child.expect_exact("> ")

        child.sendintr()  # at the prompt: a hint, not the end
        child.expect_exact("[Ctrl-C again, /exit or Ctrl-D to quit]")
        child.expect_exact("> ")
        child.sendline("/system you are a pirate")
        child.expect_exact('[conversation reset; system prompt: "you are a pirate"]')
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact('[conversation reset; system prompt: "you are a pirate"]')
        child.expect_exact("> ")
        child.sendline("/oops")
        child.expect_exact("[unknown command /oops] commands: /reset")
        child.expect_exact("> ")

        child.sendline("ahoy")  # the program still answers after a stopped answer: this one runs to its end
        child.expect_exact("ahoy\r\n")
        child.expect_exact("\r\n> ", timeout=120)
        assert len(child.before.strip()) > 20 and "[stopped]" not in child.before
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_chat_on_a_trained_lora_run(trained_lora_run):
    """The session's trained run (tests/ranks/conftest.py): final/'s adapter on its base, the conversation in
    the run's chatml template, whose <|im_end|> (plain text to the tiny tokenizer) is the answer's stop string."""
    from launcher.source import load_source

    source = load_source(str(trained_lora_run), device="cpu")
    out = io.StringIO()
    chat = Chat(source, SamplingSettings(40, temperature=0.0), out=out, system="You are a helpful assistant.")
    assert chat.stop_text == "<|im_end|>"
    reply = chat.answer("Give the opposite.\nslow")
    assert "<|im_end|>" not in out.getvalue() and out.getvalue().strip().startswith(reply)
    text = source.tokenizer.decode(chat.prompt_ids(chat.conversation("Add the two numbers.\n2 and 3")))
    assert text == ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGive the opposite.\nslow"
                    f"<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\nAdd the two numbers.\n2 and 3"
                    "<|im_end|>\n<|im_start|>assistant\n")
