"""Model FLOPs per token and the device's measured matmul rate: what MFU is computed from.

This module owns measuring a matmul rate, for MFU and for choosing the CPU matmul engine (the fp32 CPU
rates of both engines, `cpu_engine_rates`); the kernels it times live in training/kernels/cpu_gemm.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from training.kernels.cpu_gemm import onednn_available, onednn_linear


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters that take part in matmuls: everything but the input embeddings,
    whose lookup costs no FLOPs. Tied output embeddings still count once (the lm_head matmul)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_ids = {id(p) for p in output.parameters()} if output is not None else set()
    trainable = frozen = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or (id(p) in embedding_ids and id(p) not in output_ids):
            continue
        seen.add(id(p))
        quant_state = getattr(p, "quant_state", None)  # 4-bit weights are packed: count the logical shape
        # ZeRO-3 leaves an empty placeholder in the module and records the real size in ds_numel.
        numel = math.prod(quant_state.shape) if quant_state is not None else getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += numel
        else:
            frozen += numel
    return trainable, frozen


def train_flops_per_token(trainable: int, frozen: int, num_layers: int, hidden: int, context: float) -> float:
    """Forward 2 FLOPs per weight, backward 2 for the input gradient and 2 for the weight gradient, which
    frozen weights skip: 6·N_trainable + 4·N_frozen. Causal attention adds 6·L·d·T per token (QKᵀ and
    AV, forward and backward, over on average half of a context of T tokens)."""
    return 6 * trainable + 4 * frozen + 6 * num_layers * hidden * context


def measured_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3, matmul=None) -> float:
    """Dense matmul FLOP/s this device reaches in `dtype`, measured (no vendor table to go stale), by
    `matmul(a, b)` (a product of two n x n matrices; default `a @ b`). Its random operands come from a
    generator of its own: the run's RNG state (restored from a checkpoint, driving dropout) must not move."""
    n = 4096 if device.type == "cuda" else 512
    matmul = matmul or torch.matmul
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        matmul(a, b)  # warm-up: kernels picked, clocks up
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            matmul(a, b)
        count += 4
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed


PEAK_CACHE = Path("~/.cache/sharpen/peak_flops.json")


def peak_flops(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> float:
    """measured_peak_flops, measured once per machine and kept in `cache` (keyed by the device's name, the
    dtype, torch's thread count and version): its 0.3 s loop would otherwise come before every run's first
    step. Delete the file to measure again, e.g. after changing hardware under the same name. An fp32 CPU
    run's peak is that of the faster of its two matmul engines (cpu_engine_rates)."""
    if device.type == "cpu" and dtype == torch.float32:
        return max(cpu_engine_rates(cache).values())
    return cached_measure(str(dtype), device, lambda: measured_peak_flops(device, dtype), cache)


def cpu_engine_rates(cache: Path | None = None) -> dict[str, float]:
    """fp32 matmul FLOP/s of this CPU by each engine ({"aten": ..., "onednn": ...} where available),
    measured once per machine, thread count and torch version (kept in `cache`, as peak_flops)."""
    cpu = torch.device("cpu")
    measured = {"aten": lambda: measured_peak_flops(cpu, torch.float32)}
    if onednn_available():
        measured["onednn"] = lambda: measured_peak_flops(cpu, torch.float32, matmul=onednn_linear)
    return {name: cached_measure(f"fp32 gemm {name}", cpu, measure, cache) for name, measure in measured.items()}


def cached_measure(label: str, device: torch.device, measure, cache: Path | None = None) -> float:
    """`measure()`, or what it returned before on this device with this thread count and torch version."""
    key = f"{_device_name(device)} | {label} | threads {torch.get_num_threads()} | torch {torch.__version__}"
    path = (cache or PEAK_CACHE).expanduser()
    known = {}
    try:
        known = json.loads(path.read_text())
        return float(known[key])
    except (OSError, ValueError, KeyError, TypeError):
        known = known if isinstance(known, dict) else {}
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**known, key: value}, indent=1) + "\n")
        os.replace(tmp, path)  # ranks measuring at once each write a whole file; the last one stays
    except OSError:
        pass  # a read-only home: measured again next run
    return value


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu {model or os.uname().machine} x{os.cpu_count()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
