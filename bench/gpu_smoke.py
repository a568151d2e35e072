"""GPU checks the CPU suite cannot make: every strategy on CUDA (NCCL, bf16), resume, export.

    python bench/gpu_smoke.py [--work-dir DIR] [--json-out gpu-smoke.json]

Needs one CUDA GPU; each run is a world of one rank (NCCL refuses two ranks on one device). A ~20M
Llama-shaped model is built here (tokenizer trained on examples/data), then `sharpen run` trains the
alpaca fixture for STEPS steps under each case below, as a user would (a new process per run). Checked:

- every run exits 0 and its losses are finite and fall;
- bf16 compute: each strategy's losses against the single-GPU run of the same fine-tune type, within
  BF16_RTOL (bf16 matmuls in a different order are not bit-equal; the CPU suite holds fp32 to 1e-4);
- fp32 (`model.dtype fp32`, TF32 off): single, ddp, fsdp and zero3 agree to 1e-4, as on CPU;
- resume on CUDA: fsdp and zero3 runs killed after step 4 (SHARPEN_FAULT) and resumed give the
  uninterrupted run's losses to 1e-5 relative (deterministic kernels, the same order);
- `sharpen export` of the fsdp and zero3 checkpoints loads with transformers and gives finite logits;
- `sharpen doctor JOB` passes its NCCL all-reduce.

Prints one table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.env_hooks import FAULT  # noqa: E402

STEPS = 12
DEVICE = os.environ.get("SMOKE_DEVICE", "cuda")  # cpu: only to try this script where there is no GPU
BF16_RTOL = 3e-2
FP32_RTOL = 1e-4
MODEL = dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8, num_kv_heads=4)
DATA = REPO / "examples" / "data" / "alpaca_tiny.jsonl"


def build_model(work: Path) -> Path:
    from training.data.formats import ALPACA_PROMPT_WITH_INPUT
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = work / "model"
    if (out / "config.json").exists():
        return out
    files = sorted((REPO / "examples" / "data").glob("*.jsonl"))
    corpus = [ALPACA_PROMPT_WITH_INPUT] * 50 + [t for f in files for t in corpus_from_jsonl(f)]
    return Path(build_tiny_llama(str(out), corpus=corpus, seed=0, **MODEL))


def job(model: Path, cache: Path, strategy: str, finetune: str, dtype: str) -> dict:
    ft = {"type": "full"} if finetune == "full" else {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    return {
        "name": f"smoke-{strategy}-{finetune}-{dtype}",
        "model": {"path": str(model), "dtype": dtype, "attention": "sdpa"},
        "finetune": ft,
        "method": {"kind": "sft"},
        "data": {"train": [{"path": str(DATA), "format": "alpaca"}], "max_length": 256, "cache_dir": str(cache)},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "max_steps": STEPS, "lr": 2e-3 if finetune == "lora" else 3e-4,
                  "warmup_steps": 2, "seed": 0, "save_every": 4},
        "strategy": {"name": strategy},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": DEVICE,
    }


def sharpen(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(REPO))


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def max_rel(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append((name, ok, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-gpu-smoke")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args()
    import torch
    import yaml

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke.py needs a CUDA GPU")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    cache = work / "cache"
    checks = Checks()
    results: dict[str, dict] = {}

    def run(name: str, spec: dict, extra: tuple[str, ...] = (), env: dict | None = None, fresh: bool = True):
        run_dir = work / "runs" / name
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        t = time.perf_counter()
        out = sharpen("run", str(path), "--output-dir", str(run_dir), *extra, env=env)
        wall = time.perf_counter() - t
        (work / f"{name}.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
        got = losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        results[name] = {"rc": out.returncode, "wall_s": wall, "losses": got}
        return out, run_dir, got

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    base: dict[tuple[str, str], list[float]] = {}
    cases = [(s, f, d) for d in ("bf16", "fp32") for f in ("full", "lora") for s in ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")]
    cases = [c for c in cases if not (c[2] == "fp32" and (c[0] in ("zero1", "zero2") or c[1] == "lora"))]
    for strategy, finetune, dtype in cases:
        name = f"{strategy}-{finetune}-{dtype}"
        if not wanted(name):
            continue
        out, run_dir, got = run(name, job(model, cache, strategy, finetune, dtype))
        if out.returncode != 0 or len(got) != STEPS:
            tail = (out.stderr or out.stdout).strip().splitlines()[-8:]
            checks.add(name, False, f"exit {out.returncode}, {len(got)} steps: " + " | ".join(tail))
            continue
        finite = all(math.isfinite(x) for x in got)
        detail = f"loss {got[0]:.4f} -> {got[-1]:.4f}, {results[name]['wall_s']:.1f} s"
        if strategy == "single":
            base[(finetune, dtype)] = got
            checks.add(name, finite and got[-1] < got[0], detail)
        elif (finetune, dtype) in base:
            rel = max_rel(got, base[(finetune, dtype)])
            tol = BF16_RTOL if dtype == "bf16" else FP32_RTOL
            checks.add(name, finite and rel <= tol, f"{detail}; vs single max rel {rel:.1e} (tol {tol:.0e})")
        else:
            checks.add(name, finite, detail)

    for strategy in ("fsdp", "zero3"):
        name = f"resume-{strategy}"
        if not wanted(name):
            continue
        spec = job(model, cache, strategy, "full", "bf16")
        _, _, whole = run(f"{name}-whole", spec)
        out, run_dir, _ = run(name, spec, env={FAULT: "kill-after-step:5"})
        killed = out.returncode != 0
        out2 = sharpen("resume", str(run_dir))
        (work / f"{name}-resume.log").write_text(out2.stdout + "\n--- stderr ---\n" + out2.stderr)
        got = losses(run_dir)
        rel = max_rel(got, whole)
        checks.add(name, killed and out2.returncode == 0 and rel <= 1e-5,
                   f"killed exit {out.returncode}, resume exit {out2.returncode}, {len(got)} steps, max rel vs whole {rel:.1e}")
        if out2.returncode == 0 and wanted(f"export-{strategy}"):
            dest = work / f"export-{strategy}"
            shutil.rmtree(dest, ignore_errors=True)
            ex = sharpen("export", str(run_dir), "--to", str(dest))
            ok = ex.returncode == 0
            detail = f"exit {ex.returncode}"
            if ok:
                from transformers import AutoModelForCausalLM

                m = AutoModelForCausalLM.from_pretrained(dest).to(DEVICE)
                logits = m(torch.arange(1, 33, device=DEVICE)[None]).logits
                ok = bool(torch.isfinite(logits).all())
                detail += f", logits finite {ok}, dtype {next(m.parameters()).dtype}"
                del m
            else:
                detail += ": " + " | ".join((ex.stderr or ex.stdout).strip().splitlines()[-4:])
            checks.add(f"export-{strategy}", ok, detail)

    if wanted("doctor"):
        path = work / "doctor.yaml"
        path.write_text(yaml.safe_dump(job(model, cache, "fsdp", "full", "bf16"), sort_keys=False))
        d = sharpen("doctor", str(path))
        (work / "doctor.log").write_text(d.stdout + "\n--- stderr ---\n" + d.stderr)
        checks.add("doctor", d.returncode == 0, f"exit {d.returncode}: " + " | ".join(d.stdout.strip().splitlines()[-6:]))

    failed = [n for n, ok, _ in checks.rows if not ok]
    print(f"\n{len(checks.rows) - len(failed)}/{len(checks.rows)} checks passed on {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}"
          f" (torch {torch.__version__}, CUDA {torch.version.cuda})")
    if failed:
        print("failed: " + ", ".join(failed))
    if args.json_out:
        args.json_out.write_text(json.dumps({"checks": checks.rows, "runs": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
