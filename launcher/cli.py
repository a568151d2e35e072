"""The `sharpen` command line: parse, then dispatch to launcher/commands/. Exit codes: 0 done, 1 the run
failed, 2 bad job file or arguments (one message, never a traceback)."""

from __future__ import annotations

import argparse
import os
import sys

from launcher import __version__
from launcher.commands import chat, compare, doctor, evaluate, export, generate, preview, run, runs, slurm
from launcher.errors import UserError

EXIT_USAGE = 2
GROUPS = (run, preview, export, generate, chat, evaluate, slurm, runs, compare, doctor)  # the order of `sharpen --help`


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (its default), but never prints a traceback."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sharpen", description="Fine-tune language models from one job file.")
    parser.add_argument("--version", action="version", version=f"sharpen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {name: handler for group in GROUPS for name, handler in group.COMMANDS.items()}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sharpen logs RUN | head`: the reader has gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
