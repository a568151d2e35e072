"""Records/s of sharpen's data preparation beside a bare `datasets.map(batched=True, num_proc=N)`, and the time
to the first step of a job whose data is not tokenized yet.

    python bench/bench_tokenize.py --records 200000 --num-proc 2 --rounds 3 --threads 1 --json-out tok.json
    python bench/bench_tokenize.py --records 20000 --rounds 1          # a quick run

One alpaca JSONL file of mixed lengths (a seeded generator: 1-60 word instructions, an input a third of the
time, 1-400 word outputs) and one fast byte-level BPE tokenizer (training/tiny.py, trained on that file's
first records, with the tiny model that the run arm trains). Each arm is a fresh process per round, arms
interleaved (sharpen, bare, sharpen, bare, ...), every round into empty cache directories:

- sharpen: `prepare_dataset` of the file (tokenizer load, cache key, the UTF-8 check, reading the JSON,
  encoding with offsets into ids and shifted labels, truncation, save_to_disk), then the same call again:
  a cache hit, timed, and checked to be one (nothing built).
- bare: tokenizer load, `datasets.load_dataset("json")`, `ds.map(tokenizer(prompt + output), batched=True,
  num_proc=N)` into an Arrow file: the least any tool does with this file.
- run (with --run): `sharpen run` of a one-rank CPU job on the file, start to its first metrics line, with
  an empty cache (cold) and then again with the cache filled (warm: the usual start).

Records/s counts the file's records over each arm's wall seconds inside its process (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model data train step token batch rank loss sample shard resume plan cache file line record "
         "weight source mix epoch order seed prompt answer code chat text json arrow tokenize process core").split()


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for i in range(n):
            record = {"instruction": f"{i}: " + words(1, 60), "input": words(1, 40) if rng.random() < 1 / 3 else "",
                      "output": words(1, 400 if rng.random() < 0.2 else 80)}
            f.write(json.dumps(record) + "\n")
    return path


def child_sharpen(args) -> dict:
    from launcher.spec import DataSpec
    from training.data import cache as C
    from training.data.prepare import prepare_dataset

    spec = DataSpec(train=[{"path": args.file}], max_length=args.max_length, num_proc=args.num_proc)
    start = time.perf_counter()
    path = prepare_dataset(spec, "sft", args.model, cache_root=args.cache)
    seconds = time.perf_counter() - start
    builds = C.builds_in_this_process
    start = time.perf_counter()
    again = prepare_dataset(spec, "sft", args.model, cache_root=args.cache)
    hit = time.perf_counter() - start
    assert again == path and C.builds_in_this_process == builds, "the second prepare was not a cache hit"
    return {"seconds": seconds, "hit_s": hit, "rows": json.loads((path / C.META_FILE).read_text())["rows"]}


def child_bare(args) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from training.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    datasets.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ds = datasets.load_dataset("json", data_files=[args.file], split="train", cache_dir=args.cache)

    def tokenize(batch):
        texts = [
            (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(instruction=ins, input=extra) + out
            for ins, extra, out in zip(batch["instruction"], batch["input"], batch["output"], strict=True)
        ]
        return tokenizer(texts, truncation=True, max_length=args.max_length)

    out = ds.map(tokenize, batched=True, num_proc=args.num_proc if args.num_proc > 1 else None,
                 remove_columns=ds.column_names, cache_file_name=str(Path(args.cache) / "bare.arrow"))
    return {"seconds": time.perf_counter() - start, "rows": len(out)}


def run_child(arm: str, args, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", arm, "--file", str(args.file), "--model", str(args.model),
           "--cache", str(cache), "--num-proc", str(args.num_proc), "--max-length", str(args.max_length)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def first_step(args, work: Path, name: str, cache: Path) -> float:
    """`sharpen run` start to its first metrics line, seconds."""
    import yaml

    job = {
        "name": "bench-tokenize", "model": {"path": str(args.model)}, "finetune": {"type": "lora", "r": 8, "alpha": 16},
        "method": {"kind": "sft"},
        "data": {"train": [{"path": str(args.file)}], "max_length": args.max_length, "cache_dir": str(cache),
                 "num_proc": args.num_proc},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": 1, "lr": 1e-3},
        "strategy": {"name": "single"}, "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False}, "device": "cpu",
    }
    job_file = work / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    run_dir = work / name
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(job_file), "--output-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    metrics, seen = run_dir / "metrics.jsonl", None
    while proc.poll() is None and seen is None:
        if metrics.exists() and metrics.read_text().strip():
            seen = time.time() - start
        time.sleep(0.01)
    proc.wait()
    if seen is None and metrics.exists() and metrics.read_text().strip():
        seen = metrics.stat().st_mtime - start
    if seen is None:
        raise SystemExit(f"sharpen run failed:\n{proc.stderr.read()[-3000:]}")
    return seen


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the run arm (OMP_NUM_THREADS)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--run", action="store_true", help="also time `sharpen run` to its first step, cold and warm")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--json-out")
    p.add_argument("--child", choices=("sharpen", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps((child_sharpen if args.child == "sharpen" else child_bare)(args)))
        return

    sys.path.insert(0, str(REPO))
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    work = Path(args.work or tempfile.mkdtemp(prefix="sharpen-bench-tok-"))
    work.mkdir(parents=True, exist_ok=True)
    args.file = work / f"alpaca-{args.records}.jsonl"
    if not args.file.exists():
        write_records(args.file, args.records)
    args.model = work / "model"
    if not (args.model / "config.json").exists():
        build_tiny_llama(args.model, corpus_from_jsonl(args.file)[:2000], vocab_size=2048)
    size_mb = args.file.stat().st_size / 1e6
    print(f"{args.records} records ({size_mb:.0f} MB), num_proc {args.num_proc}, {args.rounds} round(s), work {work}",
          file=sys.stderr)

    results: dict[str, list] = {"sharpen": [], "bare": [], "run_cold": [], "run_warm": []}
    for r in range(args.rounds):
        for arm in ("sharpen", "bare") if r % 2 == 0 else ("bare", "sharpen"):
            out = run_child(arm, args, work / f"cache-{arm}-{r}")
            results[arm].append(out)
            print(f"round {r} {arm}: {out['seconds']:.1f} s, {args.records / out['seconds']:,.0f} records/s"
                  + (f", cache hit {1000 * out['hit_s']:.0f} ms" if "hit_s" in out else ""), file=sys.stderr)
        if args.run:
            cache = work / f"cache-run-{r}"
            results["run_cold"].append(first_step(args, work, f"cold-{r}", cache))
            results["run_warm"].append(first_step(args, work, f"warm-{r}", cache))
            print(f"round {r} run: first step {results['run_cold'][-1]:.1f} s cold, {results['run_warm'][-1]:.1f} s warm",
                  file=sys.stderr)

    sharpen_s = [o["seconds"] for o in results["sharpen"]]
    bare_s = [o["seconds"] for o in results["bare"]]
    ratio = median(bare_s) / median(sharpen_s)
    pairs = [b / s for s, b in zip(sharpen_s, bare_s, strict=True)]
    lines = [
        f"{'':16}{'seconds':>22}{'records/s':>14}",
        f"{'sharpen':16}{median(sharpen_s):>10.1f} ({min(sharpen_s):.1f}-{max(sharpen_s):.1f}){args.records / median(sharpen_s):>14,.0f}",
        f"{'bare map':16}{median(bare_s):>10.1f} ({min(bare_s):.1f}-{max(bare_s):.1f}){args.records / median(bare_s):>14,.0f}",
        f"sharpen / bare records/s: {ratio:.2f}x (per round {min(pairs):.2f}-{max(pairs):.2f}x; target >= 0.8x)",
        f"cache hit: {1000 * median([o['hit_s'] for o in results['sharpen']]):.0f} ms median "
        f"(max {1000 * max(o['hit_s'] for o in results['sharpen']):.0f} ms)",
    ]
    if args.run:
        cold, warm = median(results["run_cold"]), median(results["run_warm"])
        budget = 1.2 * median(bare_s) + warm
        lines.append(f"sharpen run to first step: {cold:.1f} s with tokenizing, {warm:.1f} s from the cache; "
                     f"1.2 x bare ({median(bare_s):.1f} s) + the usual start = {budget:.1f} s: "
                     f"{'met' if cold <= budget else 'NOT met'} ({cold / (median(bare_s) + warm):.2f}x of bare + start)")
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "results": results, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
