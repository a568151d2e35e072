"""Write examples/grpo/prompts.jsonl: prompts (format `prompt`) for the GRPO example, from the demo's tasks.

Each record is a `prompt` in the alpaca template (a string, as TRL's string prompts carry theirs) and an
`answer` column, which reaches the reward functions as `answer=[...]` (rewards.py). Deterministic: the
same seed writes the same bytes. Kept in examples/grpo/, not examples/data/: make_tiny_model.py trains
its tokenizer on examples/data/*.jsonl, and a new file there would change the demo model.

    python examples/grpo/make_prompts.py [--out examples/grpo/prompts.jsonl] [--count 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from make_dataset import PROMPT, PROMPT_WITH_INPUT, alpaca_record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "prompts.jsonl"))
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(f"{args.seed}-grpo")
    rows = []
    for _ in range(args.count):
        r = alpaca_record(rng)
        template = PROMPT_WITH_INPUT if r["input"] else PROMPT
        rows.append({"prompt": template.format(**r), "answer": r["output"]})
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
