"""The built-in chat templates (model.chat_template), one .jinja file each, and loading one by name or path.

Each template marks the assistant's text with `{% generation %}` blocks, so the loss mask comes from the
template itself (transformers' return_assistant_tokens_mask), not from diffing renderings of prefixes.
"""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.spec import CHAT_TEMPLATES

HERE = Path(__file__).resolve().parent


def builtin_path(name: str) -> Path:
    return HERE / f"{name}.jinja"


def load_chat_template(value: str) -> str:
    """The template text of model.chat_template: a built-in name, or a path to a .jinja file."""
    if value in CHAT_TEMPLATES:
        return builtin_path(value).read_text()
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(
            f"model.chat_template: {value!r} is neither a built-in template nor a file ({path.absolute()} not found)",
            hint=f"use one of {', '.join(CHAT_TEMPLATES)}, or the path of a .jinja file",
        )
    return path.read_text()


def apply_chat_template_setting(tokenizer, value: str | None):
    """`tokenizer` with model.chat_template in place of its own template (unchanged when value is None)."""
    if value is not None:
        tokenizer.chat_template = load_chat_template(value)
    return tokenizer
