"""Write the small demo datasets in examples/data/ (deterministic: the same seed writes the same bytes).

The tasks are templated so that a model of 0.1-4M parameters visibly learns within ~60 steps: a fixed
instruction names the task, and the answer follows from the input by a rule (copy, reverse, sort,
count) or a small lookup table (colors, opposites). Inputs of 1 to 30 items give mixed lengths.
The preference pairs (DPO, reward models) put each task's right answer against a hedged wrong one
("Maybe" and a mistake of a consistent kind: off by one, the input unchanged, the wrong color), so a
tiny model learns the preference within a few steps, its style first and then its content.

    python examples/make_dataset.py [--out examples/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = {
    "banana": "yellow", "lemon": "yellow", "apple": "red", "cherry": "red", "strawberry": "red",
    "lime": "green", "grass": "green", "leaf": "green", "sky": "blue", "sea": "blue",
    "snow": "white", "milk": "white", "coal": "black", "night": "black", "orange": "orange",
    "carrot": "orange", "plum": "purple", "grape": "purple", "chocolate": "brown", "soil": "brown",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "light": "dark",
    "early": "late", "happy": "sad", "full": "empty", "old": "new", "high": "low", "wet": "dry",
    "left": "right", "loud": "quiet", "hard": "soft", "strong": "weak", "near": "far", "rich": "poor",
}
OPPOSITES |= {v: k for k, v in OPPOSITES.items()}
WORDS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "bat", "elk", "yak",
         "red", "blue", "green", "sun", "moon", "star", "tree", "rock", "river", "cloud", "rain", "wind"]
NAMES = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]


def alpaca_record(rng: random.Random) -> dict:
    """One instruction/input/output triple from one of ten templated tasks."""
    task = rng.randrange(10)
    if task == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
    if task == 1:
        thing = rng.choice(sorted(COLORS))
        return {"instruction": "Name the color.", "input": thing, "output": f"The {thing} is {COLORS[thing]}."}
    if task == 2:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": "Give the opposite.", "input": word, "output": OPPOSITES[word]}
    if task == 3:
        word = rng.choice(WORDS)
        return {"instruction": "Repeat the word three times.", "input": word, "output": " ".join([word] * 3)}
    if task == 4:
        items = rng.sample(WORDS, rng.randint(2, 9))
        return {"instruction": "Reverse the list.", "input": ", ".join(items), "output": ", ".join(items[::-1])}
    if task == 5:
        items = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        return {"instruction": "Count the words.", "input": " ".join(items), "output": str(len(items))}
    if task == 6:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 10))]
        return {"instruction": "Sort the numbers.", "input": " ".join(map(str, numbers)),
                "output": " ".join(map(str, sorted(numbers)))}
    if task == 7:
        name = rng.choice(NAMES)
        return {"instruction": f"Say hello to {name}.", "input": "", "output": f"Hello, {name}!"}
    if task == 8:
        n = rng.randint(0, 98)
        return {"instruction": f"What number comes after {n}?", "input": "", "output": str(n + 1)}
    n = rng.randint(2, 30)
    return {"instruction": f"Count from 1 to {n}.", "input": "", "output": " ".join(map(str, range(1, n + 1)))}


PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def wrong_answer(record: dict, rng: random.Random) -> str:
    """A wrong output for an alpaca_record, of a kind that depends on its task only."""
    instruction, given, output = record["instruction"], record["input"], record["output"]
    if instruction == "Name the color.":
        wrong = rng.choice(sorted({c for c in COLORS.values() if c != COLORS[given]}))
        return f"The {given} is {wrong}."
    if instruction == "Give the opposite.":
        return given
    if instruction == "Repeat the word three times.":
        return " ".join([given] * 2)
    if instruction in ("Reverse the list.", "Sort the numbers."):
        return given if given != output else output + ", " + output
    if instruction.startswith("Say hello to"):
        return output.replace("Hello", "Goodbye")
    if instruction.startswith("Count from 1 to"):
        return " ".join(output.split()[:-1]) or "0"
    return str(int(output) + rng.choice([-2, -1, 1, 2]))  # sums, counts, successors: off by a little


def preference_record(rng: random.Random) -> dict:
    """A prompt in the alpaca template (as TRL's string prompts carry theirs), a right and a wrong answer."""
    r = alpaca_record(rng)
    template = PROMPT_WITH_INPUT if r["input"] else PROMPT
    wrong = wrong_answer(r, rng)
    return {"prompt": template.format(**r), "chosen": r["output"], "rejected": "Maybe " + wrong[:1].lower() + wrong[1:]}


def chat_record(rng: random.Random) -> dict:
    """A conversation of 1-3 user/assistant turns over the same tasks, sometimes with a system turn."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        r = alpaca_record(rng)
        question = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]
    return {"messages": messages}


def text_record(rng: random.Random) -> dict:
    """A short paragraph of 1-6 true sentences built from the same facts."""
    sentences = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(3)
        if kind == 0:
            thing = rng.choice(sorted(COLORS))
            sentences.append(f"The {thing} is {COLORS[thing]}.")
        elif kind == 1:
            word = rng.choice(sorted(OPPOSITES))
            sentences.append(f"The opposite of {word} is {OPPOSITES[word]}.")
        else:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            sentences.append(f"{a} plus {b} is {a + b}.")
    return {"text": " ".join(sentences)}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(out / "alpaca_tiny.jsonl", [alpaca_record(rng) for _ in range(1600)])
    write_jsonl(out / "chat_tiny.jsonl", [chat_record(rng) for _ in range(240)])
    write_jsonl(out / "text_tiny.jsonl", [text_record(rng) for _ in range(320)])
    rng = random.Random(f"{args.seed}-preference")  # its own stream: the files above stay as they were
    write_jsonl(out / "preference_tiny.jsonl", [preference_record(rng) for _ in range(480)])
    print(f"wrote alpaca_tiny.jsonl (1600), chat_tiny.jsonl (240), text_tiny.jsonl (320), "
          f"preference_tiny.jsonl (480) to {out}")


if __name__ == "__main__":
    main()
