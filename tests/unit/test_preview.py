"""`sharpen preview`: what a user reads about a tiny job: the samples with the loss-carrying text marked,
the lengths histogram, and how many records were truncated or dropped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from support import data_inputs
from support.data_inputs import write_jsonl

from launcher.cli import main

model_dir = data_inputs.model_dir

REPO = Path(__file__).resolve().parents[2]
RECORDS = [
    {"conversations": [{"from": "human", "value": "Say hello to Ada."}, {"from": "gpt", "value": "Hello, Ada!"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 3 and 4."},
                       {"from": "gpt", "value": "7"}, {"from": "human", "value": "And 5 and 6?"},
                       {"from": "gpt", "value": "11"}]},
    {"conversations": [{"from": "human", "value": "Reverse the list: " + "cat, dog, owl, " * 80},
                       {"from": "gpt", "value": "owl, dog, cat"}]},  # longer than max_length: cut, no answer left
]


def job(tmp_path, model, train_on="completion") -> str:
    spec = {
        "model": {"path": str(model), "chat_template": "chatml"},
        "method": {"kind": "sft", "train_on": train_on},
        "data": {"train": [{"path": str(write_jsonl(tmp_path / "talk.jsonl", RECORDS)), "format": "sharegpt"}],
                 "max_length": 160, "cache_dir": str(tmp_path / "cache")},
        "device": "cpu",
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "job.yaml")


def test_preview_marks_the_trained_text_and_counts_what_was_cut(model_dir, tmp_path, capsys, monkeypatch):
    path = job(tmp_path, model_dir)
    assert main(["preview", path, "--n", "2"]) == 0
    out = capsys.readouterr().out
    samples = out.split(" lengths ")[0]
    # not a terminal: the loss-carrying text in [[ ]], exactly the answers and their end-of-turn token
    assert re.findall(r"\[\[(.*?)\]\]", samples, re.S) == ["Hello, Ada!<|im_end|>", "7<|im_end|>", "11<|im_end|>"]
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 3 and 4.<|im_end|>\n" in out
    assert re.search(r"sample 2: \d+ tokens, \d+ with loss", out) and "sample 3" not in out
    assert re.search(r"^\s*\d+-\d+\s+tokens \| #+ 1$", out, re.M)  # a histogram bar of one row
    assert "2 rows, " in out and "max_length 160" in out
    assert "3 records: 1 truncated to 160 tokens, 0 dropped as too long, 1 dropped with no token to learn from" in out

    assert main(["preview", path, "--n", "2", "--set", "method.train_on=last_turn"]) == 0  # the final answers only
    assert re.findall(r"\[\[(.*?)\]\]", capsys.readouterr().out.split(" lengths ")[0], re.S) == [
        "Hello, Ada!<|im_end|>", "11<|im_end|>"]

    # A terminal: the answers styled (bold black on green), no brackets. (Not by FORCE_COLOR: datasets' parallel
    # map replaces os.environ with a copy, and rich goes on reading the one it saw at import.)
    import os

    from rich.console import Console

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(Console, "_environ", {**os.environ, "FORCE_COLOR": "1"})
    assert main(["preview", path, "--n", "1"]) == 0
    colored = capsys.readouterr().out
    assert "[[" not in colored and re.search(r"\x1b\[[0-9;]*42m[^\x1b]*Hello, Ada!", colored)
    assert "█" in colored


def test_preview_through_the_installed_command_line(model_dir, tmp_path):
    """The real CLI in a child process: registered, exit 0, the same marked text."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "preview", job(tmp_path, model_dir), "--n", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[[Hello, Ada!<|im_end|>]]" in done.stdout and "3 records: 1 truncated" in done.stdout
