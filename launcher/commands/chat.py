"""`sharpen chat SOURCE`: talk to a model in the terminal, each answer printed as its tokens are sampled.

The conversation is a message list, formatted each turn with the source's chat template and its generation
prompt (a source without a template: plain "User: ... / Assistant:" text, said at the start), and encoded
as training encodes a prompt. Answers come from GRPO's decode loop (training/rollout/generate.py) through
its `on_token` hook. Ctrl-C while an answer streams stops that answer (what it had said stays in the
conversation, marked `[stopped]`); at the prompt it says how to quit, and a second Ctrl-C quits.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from launcher.errors import UserError
from launcher.source import (
    Source,
    add_source_arguments,
    check_source,
    end_of_turn,
    source_from_args,
)

if TYPE_CHECKING:
    from training.rollout.generate import SamplingSettings

PROMPT = "> "
HELP = "commands: /reset (forget the conversation), /system TEXT (a new system prompt; resets), /exit (or Ctrl-D)"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
HOLD_BACK = "\ufffd"  # what a decode ends with while a multi-byte character's last bytes are still to come
# Control characters a model may sample (ESC, CR, ...) would drive the terminal: shown as U+FFFD instead.
UNPRINTABLE = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def register(sub) -> None:
    """The `chat` subcommand's arguments."""
    p = sub.add_parser("chat", help="talk to a run's model (or any model) in the terminal, answers streamed")
    add_source_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="the system prompt the conversation starts with")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens per answer at most (256)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0: greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling's mass (0.9; 1: off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed and inputs give the same answers")


class TextStream:
    """Token ids in, the text to print next out. The whole answer so far is decoded each time and its new
    suffix printed, so tokens that decode together (a character's UTF-8 bytes split across byte-level tokens,
    SentencePiece's leading spaces) print right; a decode that ends in U+FFFD waits for its next token, and
    text that may be the start of a stop string waits until it is clearly not."""

    def __init__(self, tokenizer: Any, stop: str | None = None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.shown = ""
        self.hit_stop = False

    @property
    def text(self) -> str:
        """The answer as decoded so far, up to a stop string."""
        return self._cut(self._decode())

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to print."""
        self.ids.extend(ids)
        text = self._cut(self._decode())
        if not self.hit_stop:
            text = text.rstrip(HOLD_BACK)
            if self.stop:  # the longest end of the text that a stop string begins with: not yet
                text = text[: len(text) - _stop_prefix_length(text, self.stop)]
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the text, held back or not."""
        return self._advance(self.text)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _cut(self, text: str) -> str:
        if self.stop and self.stop in text:
            self.hit_stop = True
            return text[: text.index(self.stop)]
        return text

    def _advance(self, text: str) -> str:
        # A later decode only ever extends an earlier one (no clean-up of spaces), so the new text is a suffix.
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        if len(text) > len(self.shown):
            self.shown = text
        return new


def _stop_prefix_length(text: str, stop: str) -> int:
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Chat:
    """One conversation with a source: its messages, its system prompt, and the answers it streams to `out`."""

    def __init__(
        self, source: Source, settings: SamplingSettings, seed: int = 0, system: str | None = None,
        out: TextIO = sys.stdout,
    ):
        self.source = source
        self.settings = settings
        self.seed = seed
        self.out = out
        self.system = system or None
        self.messages: list[dict] = []
        self.answers = 0  # each answer's key: a seed and the session's answer count
        self.stop_requested = False
        self.end_ids, self.stop_text = end_of_turn(source.tokenizer, source.chat_template, source.model)
        config = getattr(source.model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)

    # -- the conversation ------------------------------------------------------------------------------

    def conversation(self, user_text: str) -> list[dict]:
        """The messages of the next turn: the system prompt, the turns so far, the user's new text."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages + [{"role": "user", "content": user_text}]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation as the model continues it: the chat template with the assistant's turn opened
        (or plain text without one), encoded as training encodes a prompt (BOS first)."""
        from training.data.formats import Encoder, encode_prompt

        if self.source.chat_template is None:
            value: Any = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
        else:
            value = messages
        return encode_prompt({"prompt": [value]}, Encoder(self.source.tokenizer))[0][0]

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    # -- one answer ------------------------------------------------------------------------------------

    def answer(self, user_text: str) -> str | None:
        """Stream the model's answer to `user_text` and keep both in the conversation; returns the answer
        (None when the turn could not be formatted or does not fit). Ctrl-C stops it where it is."""
        from training.rollout.generate import generate

        messages = self.conversation(user_text)
        try:
            ids = self.prompt_ids(messages)
        except Exception as error:  # the template refuses the conversation (a system turn it has no place for)
            self.say(f"[the chat template refused this conversation: {error}]")
            return None
        budget = self.settings.max_completion_length
        if self.max_positions:
            budget = min(budget, self.max_positions - len(ids))
        if budget < 1:
            self.say(f"[the conversation is {len(ids)} tokens, the model's limit is {self.max_positions}: /reset]")
            return None
        stream = TextStream(self.source.tokenizer, self.stop_text)

        def on_token(tokens) -> bool:
            self.write(stream.push([int(tokens[0])]).translate(UNPRINTABLE))
            return self.stop_requested or stream.hit_stop

        settings = replace(self.settings, max_completion_length=budget)
        stopped, cut = False, False
        with self.ctrl_c_stops():
            try:
                out = generate(self.source.model, [ids], [(self.seed, self.answers)], settings,
                               self.source.tokenizer.pad_token_id, self.end_ids, inference=True, on_token=on_token)
                stopped = out.stopped and not stream.hit_stop
                cut = out.truncated[0]
            except KeyboardInterrupt:  # a second Ctrl-C: the decode interrupted where it was
                stopped = True
        self.answers += 1
        self.write(stream.finish().translate(UNPRINTABLE))
        limit = (f"--max-new-tokens {budget}" if budget == self.settings.max_completion_length else
                 f"the model's {self.max_positions} positions")
        self.write((" [stopped]" if stopped else f" [cut at {limit}]" if cut else "") + "\n")
        reply = stream.text.strip()
        if reply or not stopped:  # an answer stopped before it said anything leaves no turn behind
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
        return reply

    @contextlib.contextmanager
    def ctrl_c_stops(self) -> Iterator[None]:
        """While an answer streams, Ctrl-C asks the decode to stop after the token it is on; a second one
        interrupts it where it is."""
        self.stop_requested = False

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- what the user types ---------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """One line from the user: a command or a message. False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.answer(line)
            return True
        command, _, rest = line.partition(" ")
        if command == "/exit":
            return False
        if command in ("/reset", "/system"):
            if command == "/system":
                self.set_system(rest.strip())
            else:
                self.reset()
            self.say(f'[conversation reset; system prompt: "{self.system}"]' if self.system else
                     "[conversation reset; no system prompt]")
        else:
            self.say(f"[unknown command {command}] {HELP}")
        return True

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def say(self, text: str) -> None:
        self.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    from training.rollout.generate import SamplingSettings

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature must be >= 0 (0: greedy) and --top-p in (0, 1]; got {args.temperature}, {args.top_p}")
    check_source(args.source, args.checkpoint, args.adapter)
    settings = SamplingSettings(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    print(f"sharpen: loading {args.source}", file=sys.stderr)
    source = source_from_args(args)
    chat = Chat(source, settings, args.seed, args.system)
    print(f"sharpen chat: {source.describe}")
    print("formatted with the model's chat template" if source.chat_template is not None else
          'no chat template: the conversation is plain "User: ... / Assistant:" text')
    if chat.system:
        print(f"system: {chat.system}")
    print(HELP)
    return loop(chat)


def loop(chat: Chat) -> int:
    """Read lines until /exit, Ctrl-D or two Ctrl-C in a row at the prompt."""
    with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    interrupted = False
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            chat.say("")
            return 0
        except KeyboardInterrupt:
            if interrupted:
                chat.say("")
                return 0
            interrupted = True
            chat.say("\n[Ctrl-C again, /exit or Ctrl-D to quit]")
            continue
        interrupted = False
        if not chat.handle(line):
            return 0


COMMANDS = {"chat": run}
