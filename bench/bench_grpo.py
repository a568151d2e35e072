"""GRPO benchmark (issue 15): the same job through `sharpen run` and through TRL's GRPOTrainer, interleaved.

    python bench/bench_grpo.py [--repeats 5] [--threads 1] [--finetune lora|full|both] [--json-out grpo.json]
    python bench/bench_grpo.py --arms trl     # the TRL arm alone
    python bench/bench_grpo.py --sharpen-set model.cpu_matmul=aten   # a third arm: sharpen with --set overrides

The job, the same in both arms: the bench-size Llama (~4M parameters, examples/make_tiny_model.py --size
bench), fp32, sdpa, 1 process, 1 CPU thread; prompts drawn from examples/data/alpaca_tiny.jsonl
(instruction + input as a plain string, the output's first word as an `answer` column), every prompt
exactly PROMPT_TOKENS tokens; two reward functions of bench/grpo_rewards.py in TRL's signature; 4
completions per prompt, 16 completions (4 prompts) per optimizer step, one micro-batch of 16 (TRL:
per_device_train_batch_size 16, gradient_accumulation_steps 1, so one generation per step); 32 new
tokens with min_new_tokens 32 (EOS never sampled: both generate exactly 16 x 32 tokens a step),
temperature 1, top_p 1, top_k off; beta 0 (no reference model), loss dapo, epsilon 0.2, one iteration;
torch AdamW at a constant lr, clip 1.0; LoRA r 8 alpha 16 dropout 0 on every linear layer, or full
fine-tuning. Both generate with Hugging Face models' forward and its DynamicCache (TRL through
`model.generate`, sharpen through training/rollout/generate.py's own decode loop).

What the bench holds equal beyond the settings: the prompt token ids (every prompt starts with the BOS as
text, `<s>...`: TRL tokenizes with the tokenizer's own special-token rule, which adds none for this
tokenizer, and sharpen adds BOS unless the ids already start with it, so both start from the same ids);
the prompt length (all PROMPT_TOKENS, so the two arms' different prompt orders cost the same and nothing
is padded); the number of generated tokens (checked per step in both arms). What is not held equal: the
sampled tokens (each arm has its own RNG), hence rewards and losses; they are recorded, not compared.

The figure is optimizer steps per second over the steps after SKIP_STEPS, from each run's own per-step
clock (sharpen: metrics.jsonl `elapsed_s`; TRL: a callback at `on_step_end`), median over interleaved
repeats; the ratio sharpen/TRL of the medians and its range over the A/B pairs. CPU milliseconds a step
(user + system of the process tree over the same steps, read from outside by the harness) are the steadier
figure on a shared machine.

Where a step goes, in four parts that add up to the step's wall time:
- sharpen: metrics.jsonl's `time/generate_s` (training/rollout/generate.py's decode loop), `time/score_s`
  (decoding the completions to text and the reward functions), `time/update_s` (the micro-batches' forward
  and backward and the strategy's optimizer step); other = the step less those three (the group
  advantages, building the micro-batches, logging);
- TRL: bench/trl_grpo.py's subclass of GRPOTrainer: generate = `_generate` (tokenize, `model.generate`,
  decode), score = `_calculate_rewards`, update = the loss's forward and backward plus clipping and AdamW,
  other = the rest (padding the completions into tensors, advantages, TRL's metrics, the dataloader,
  logging).
Each part is the median over the measured steps of a run, then the median over runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench import arms, harness  # noqa: E402
from bench.bench_cpu import build_model  # noqa: E402
from bench.harness import RunResult  # noqa: E402

# The fixed job. Changing it makes old figures incomparable: say so in BENCHMARKS.md.
STEPS = 12
SKIP_STEPS = 2  # steps/s over steps 3..12: the first steps carry lazy inits and one-off allocations
NUM_GENERATIONS = 4
COMPLETIONS_PER_STEP = 16  # 4 prompts x 4 completions
MICRO_BATCH = 16
MAX_COMPLETION = 32
PROMPT_TOKENS = 9  # BOS + 8
LR = 1.0e-5
SEED = 0
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
REWARD_FILE = BENCH / "grpo_rewards.py"
REWARDS = ("says_answer", "echoes_prompt")
DATA_FILE = REPO / "examples" / "data" / "alpaca_tiny.jsonl"
PHASES = ("generate_s", "score_s", "update_s", "other_s")
SHARPEN_PHASES = {"generate_s": "time/generate_s", "score_s": "time/score_s", "update_s": "time/update_s"}


def write_prompts(model_dir: Path, out: Path) -> int:
    """Every distinct alpaca_tiny instruction + input that is exactly PROMPT_TOKENS tokens with its BOS, as
    {"prompt": "<s>...", "answer": first word of the output}; returns how many."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = tokenizer.bos_token
    rows, seen = [], set()
    for line in DATA_FILE.read_text().splitlines():
        record = json.loads(line)
        prompt = f"{bos}{record['instruction']} {record['input']}".strip()
        ids = tokenizer(prompt)["input_ids"]
        if prompt in seen or len(ids) != PROMPT_TOKENS or ids[0] != tokenizer.bos_token_id:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": (record["output"].split() or [""])[0]})
    needed = STEPS * COMPLETIONS_PER_STEP // NUM_GENERATIONS
    if len(rows) < needed:
        raise SystemExit(f"{len(rows)} prompts of {PROMPT_TOKENS} tokens, fewer than the {needed} the job needs")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def job_file(model_dir: Path, prompts: Path, cache_dir: Path, finetune: str) -> dict:
    """sharpen's job file for the bench, `finetune` lora or full."""
    return {
        "name": f"bench-grpo-{finetune}",
        "model": {"path": str(model_dir), "dtype": "fp32", "attention": "sdpa"},
        "finetune": {"type": "lora", **LORA} if finetune == "lora" else {"type": "full"},
        "method": {
            "kind": "grpo", "num_generations": NUM_GENERATIONS, "max_completion_length": MAX_COMPLETION,
            "temperature": 1.0, "top_p": 1.0, "generation_kwargs": {"min_new_tokens": MAX_COMPLETION},
            "beta": 0.0, "loss": "dapo", "epsilon": 0.2, "scale_rewards": "group", "num_iterations": 1,
            "rewards": [{"function": f"{REWARD_FILE}:{name}"} for name in REWARDS],
        },
        "data": {
            "train": [{"path": str(prompts), "format": "prompt"}],
            "max_length": 128,
            "cache_dir": str(cache_dir),
        },
        "train": {
            "micro_batch_size": MICRO_BATCH, "global_batch_size": COMPLETIONS_PER_STEP, "max_steps": STEPS,
            "lr": LR, "lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "save_every": 0, "seed": SEED,
        },
        "strategy": {"name": "single"},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": "cpu",
    }


def trl_config(model_dir: Path, prompts: Path, out: Path, finetune: str, threads: int) -> dict:
    """bench/trl_grpo.py's config: the same job (see job_file)."""
    return {
        "model": str(model_dir), "prompts": str(prompts), "output_dir": str(out), "device": "cpu",
        "threads": threads, "seed": SEED, "attention": "sdpa",
        "reward_file": str(REWARD_FILE), "reward_functions": list(REWARDS),
        "per_device_train_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": COMPLETIONS_PER_STEP // MICRO_BATCH,
        "num_generations": NUM_GENERATIONS, "max_completion_length": MAX_COMPLETION, "temperature": 1.0,
        "generation_kwargs": {"min_new_tokens": MAX_COMPLETION}, "beta": 0.0, "loss": "dapo",
        "max_steps": STEPS, "lora": LORA if finetune == "lora" else None,
        "optimizer": {"lr": LR, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0},
    }


def median_phases(rows: list[dict]) -> dict[str, float | None]:
    """Each phase's median over the measured steps (None where a run did not record it)."""
    return {
        key: statistics.median(r[key] for r in rows) if all(r.get(key) is not None for r in rows) else None
        for key in PHASES
    }


class GrpoBench:
    def __init__(self, work: Path, threads: int, finetune: str):
        self.work, self.threads, self.finetune = work, threads, finetune
        self.model = build_model(work)
        self.prompts = work / "prompts.jsonl"
        self.num_prompts = write_prompts(self.model, self.prompts)
        self.job_path = work / f"job-{finetune}.yaml"
        self.job = job_file(self.model, self.prompts, work / "tokenized", finetune)
        self.job_path.write_text(yaml.safe_dump(self.job, sort_keys=False))

    def check_job(self) -> None:
        """sharpen reads the job file (and tokenizes the prompts into its cache, as `sharpen run` would, so
        its runs hit the cache)."""
        from launcher.jobfile import load_job
        from training.data.prepare import prepare_dataset

        spec = load_job(self.job_path)
        prepare_dataset(spec.data, spec.method.kind, str(self.model))

    def run_sharpen(self, repeat: int, overrides: tuple[str, ...] = (), arm: str = "sharpen") -> RunResult:
        timing, rows = arms.run_sharpen(
            self.job_path, self.work / "runs" / f"{arm}-{self.finetune}-{repeat}", steps=STEPS,
            env=arms.process_env(self.threads), window=(SKIP_STEPS, STEPS), overrides=overrides,
        )
        # Generated tokens a step: the logged mean completion length x completions (None where not logged).
        tokens = [None if r.get("completions/mean_length") is None else round(r["completions/mean_length"] *
                  COMPLETIONS_PER_STEP) for r in rows]
        if any(r.get(k) not in (None, MAX_COMPLETION) for r in rows for k in ("completions/min_length",
                                                                               "completions/max_length")):
            raise AssertionError(f"sharpen's completions are not all {MAX_COMPLETION} tokens long")
        step_times = [r["elapsed_s"] for r in rows]
        step_s = [b - a for a, b in zip([0.0, *step_times], step_times, strict=False)]
        phases = []
        for r, s in zip(rows, step_s, strict=True):
            p = {key: r.get(name) for key, name in SHARPEN_PHASES.items()} | {"step_s": s}
            timed = [p[k] for k in SHARPEN_PHASES]
            p["other_s"] = s - sum(timed) if None not in timed else None
            phases.append(p)
        return RunResult(
            arm=arm, repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
            window_cpu_s=timing.window_cpu_s, losses=[r["loss"] for r in rows], step_times=step_times,
            samples_per_step=[COMPLETIONS_PER_STEP] * STEPS,
            tokens_per_step=[t if t is not None else COMPLETIONS_PER_STEP * MAX_COMPLETION for t in tokens],
            extra={"phases": phases},
        )

    def run_trl(self, repeat: int) -> RunResult:
        out = arms.fresh_dir(self.work / "runs" / f"trl-{self.finetune}-{repeat}")
        config = trl_config(self.model, self.prompts, out, self.finetune, self.threads)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        timing = harness.run_timed(
            [sys.executable, str(BENCH / "trl_grpo.py"), str(out / "config.json")],
            env=arms.process_env(self.threads), step_log=out / "steps.jsonl", log_file=out / "bench.log",
            window=(SKIP_STEPS, STEPS), cwd=REPO,
        )
        result = json.loads((out / "result.json").read_text())
        rows = result["steps"]
        if [r["step"] for r in rows] != list(range(1, STEPS + 1)):
            raise RuntimeError(f"TRL ran steps {[r['step'] for r in rows]}, not 1..{STEPS}")
        expected = COMPLETIONS_PER_STEP * MAX_COMPLETION
        if any(r["completion_tokens"] != expected or r["completions"] != COMPLETIONS_PER_STEP for r in rows):
            raise AssertionError(f"TRL did not generate {COMPLETIONS_PER_STEP} x {MAX_COMPLETION} tokens every step")
        return RunResult(
            arm="trl", repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
            window_cpu_s=timing.window_cpu_s, losses=[r.get("loss", float("nan")) for r in rows],
            step_times=[r["t"] for r in rows], samples_per_step=[r["completions"] for r in rows],
            tokens_per_step=[r["completion_tokens"] for r in rows],
            extra={"phases": [{k: r[k] for k in (*PHASES, "step_s")} for r in rows],
                   "threads_seen": result["threads"]},
        )


def check_sharpen_tokens(results: list[RunResult]) -> None:
    expected = COMPLETIONS_PER_STEP * MAX_COMPLETION
    for r in results:
        if r.arm.startswith("sharpen") and any(t != expected for t in r.tokens_per_step):
            raise AssertionError(f"sharpen generated {r.tokens_per_step} tokens a step, not {expected} each")


def arm_summary(runs: list[RunResult]) -> dict:
    steady = [r.steady(SKIP_STEPS) for r in runs]
    steps_per_s = [1000 / s["step_ms"] for s in steady]
    phases = [median_phases(r.extra["phases"][SKIP_STEPS:]) for r in runs]
    summary = {
        "steps_per_s": harness.spread(steps_per_s),
        "step_ms": harness.spread([s["step_ms"] for s in steady]),
        "completions_per_s": harness.spread([s["samples_per_s"] for s in steady]),
        "generated_tokens_per_s": harness.spread([s["tokens_per_s"] for s in steady]),
        "wall_s": harness.spread([r.wall_s for r in runs]),
        "first_step_s": harness.spread([r.first_step_s for r in runs if r.first_step_s is not None]),
        "phase_ms": {},
    }
    cpu = [s["cpu_ms_per_step"] for s in steady if "cpu_ms_per_step" in s]
    if cpu:
        summary["cpu_ms_per_step"] = harness.spread(cpu)
    for key in PHASES:
        values = [p[key] for p in phases if p[key] is not None]
        summary["phase_ms"][key.removesuffix("_s")] = harness.spread([1000 * v for v in values]) if values else None
    # Generation alone: generated tokens over the seconds spent generating (median step).
    gen = summary["phase_ms"]["generate"]
    if gen:
        summary["tokens_per_generate_s"] = 1000 * COMPLETIONS_PER_STEP * MAX_COMPLETION / gen["median"]
    return summary


def summarise(results: list[RunResult]) -> dict:
    """Each arm's figures, and for each sharpen arm its ratios to TRL's (`ratios[arm]`)."""
    names = list(dict.fromkeys(r.arm for r in results))
    out: dict = {"arms": {n: arm_summary([r for r in results if r.arm == n]) for n in names}, "ratios": {}}
    if "trl" not in names:
        return out
    theirs = [r for r in results if r.arm == "trl"]
    b = out["arms"]["trl"]
    for name in names:
        if name == "trl":
            continue
        ours, a = [r for r in results if r.arm == name], out["arms"][name]
        ratio = {
            "steps_per_s": a["steps_per_s"]["median"] / b["steps_per_s"]["median"],
            # steps/s of a pair = TRL's step ms / sharpen's
            "per_repeat": harness.spread([
                y.steady(SKIP_STEPS)["step_ms"] / x.steady(SKIP_STEPS)["step_ms"]
                for x, y in zip(ours, theirs, strict=True)
            ]),
        }
        if "cpu_ms_per_step" in a and "cpu_ms_per_step" in b:
            ratio["per_cpu_s"] = b["cpu_ms_per_step"]["median"] / a["cpu_ms_per_step"]["median"]
            ratio["per_cpu_s_per_repeat"] = harness.spread([
                y.window_cpu_s / x.window_cpu_s for x, y in zip(ours, theirs, strict=True)
            ])
        out["ratios"][name] = ratio
    return out


def format_table(summary: dict, finetune: str, repeats: int, threads: int, labels: dict[str, str]) -> str:
    cell = harness.spread_cell
    header = ["", "steps/s", "step ms", "CPU ms/step", "generate ms", "score ms", "update ms", "other ms", "gen tok/s",
              "wall s", "1st step s"]
    rows = [header]
    for name, a in summary["arms"].items():
        phase = a["phase_ms"]
        rows.append([
            f"{labels[name]} ({finetune})", cell(a["steps_per_s"], ".2f"), cell(a["step_ms"], ".0f"),
            cell(a["cpu_ms_per_step"], ".0f") if "cpu_ms_per_step" in a else "-",
            *(cell(phase[k], fmt) if phase[k] else "-"
              for k, fmt in (("generate", ".0f"), ("score", ".1f"), ("update", ".0f"), ("other", ".1f"))),
            f"{a['tokens_per_generate_s']:.0f}" if "tokens_per_generate_s" in a else "-",
            cell(a["wall_s"], ".1f"), cell(a["first_step_s"], ".1f"),
        ])
    lines = harness.aligned_table(rows)
    lines += ["", f"median of {repeats} interleaved repeats (min-max), {threads} torch thread(s); rates over steps "
              f"{SKIP_STEPS + 1}-{STEPS}; gen tok/s: {COMPLETIONS_PER_STEP} x {MAX_COMPLETION} tokens over the "
              "median generate ms"]
    for name, ratio in summary["ratios"].items():
        r = ratio["per_repeat"]
        lines.append(f"{labels[name]} / TRL steps/s: {ratio['steps_per_s']:.2f}x (per repeat pair "
                     f"{r['min']:.2f}-{r['max']:.2f}x; target >= 1.5x)")
        if "per_cpu_s" in ratio:
            c = ratio["per_cpu_s_per_repeat"]
            lines.append(f"{labels[name]} / TRL steps per CPU-second: {ratio['per_cpu_s']:.2f}x (per repeat pair "
                         f"{c['min']:.2f}-{c['max']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per arm (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both arms")
    parser.add_argument("--finetune", choices=("lora", "full", "both"), default="both")
    parser.add_argument("--arms", choices=("both", "trl", "sharpen"), default="both",
                        help="trl: the TRL arm alone (e.g. while sharpen cannot run the job)")
    parser.add_argument("--sharpen-set", action="append", default=[], metavar="KEY=VALUE",
                        help="adds a third arm: sharpen run with these --set overrides (e.g. model.cpu_matmul=aten)")
    parser.add_argument("--json-out", type=Path, help="write the summary and every run's steps here")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-grpo",
                        help="model, prompts, tokenized data and run dirs (the model is built once and reused)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = args.work_dir.resolve()
    started, load_at_start = datetime.now(timezone.utc), os.getloadavg()[0]
    configs = ("lora", "full") if args.finetune == "both" else (args.finetune,)
    report, payload = {}, {}
    for finetune in configs:
        print(f"{finetune}: preparing in {work} ...", flush=True)
        bench = GrpoBench(work, args.threads, finetune)
        if args.arms != "trl":
            bench.check_job()
        chosen = []
        if args.arms != "trl":
            chosen.append(("sharpen", bench.run_sharpen))
            if args.sharpen_set:
                chosen.append(("sharpen_set", functools.partial(
                    bench.run_sharpen, overrides=tuple(args.sharpen_set), arm="sharpen_set")))
        if args.arms != "sharpen":
            chosen.append(("trl", bench.run_trl))
        results = harness.interleave(chosen, args.repeats, report=lambda s: print(s, flush=True))
        check_sharpen_tokens(results)
        summary = summarise(results)
        labels = {"sharpen": "sharpen", "sharpen_set": "sharpen " + " ".join(args.sharpen_set), "trl": "TRL GRPOTrainer"}
        report[finetune] = format_table(summary, finetune, args.repeats, args.threads, labels)
        print("\n" + report[finetune] + "\n", flush=True)
        payload[finetune] = {
            "job": job_file(Path("MODEL"), Path("PROMPTS"), Path("CACHE"), finetune), "summary": summary,
            "runs": harness.results_as_dicts(results),
        }
    if args.json_out:
        harness.write_json(args.json_out, {
            "bench": "grpo", "date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": harness.machine() | {"trl": _version("trl")},
            "load_avg_1m_at_start": round(load_at_start, 2), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "threads": args.threads, "repeats": args.repeats, "steps": STEPS, "skip_steps": SKIP_STEPS,
            "arms": args.arms, "sharpen_set": args.sharpen_set, "configs": payload, "tables": report,
        })
        print(f"wrote {args.json_out}")
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
