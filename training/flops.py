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

from strategies.footprint.counts import active_numel, routed_experts
from training.env_hooks import PEAK_CACHE as PEAK_CACHE_VAR
from training.kernels.cpu_gemm import onednn_available, onednn_linear


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters that take part in a token's matmuls: everything but the input
    embeddings, whose lookup costs no FLOPs. Tied output embeddings still count once (the lm_head matmul).
    A mixture of experts counts the experts a token is routed to: of each expert weight, experts_per_token
    of every num_experts (the same rule as the planner's active parameters). A frozen weight that LoRA
    adapts in place (PEFT's ParamWrapper on 3D expert weights: weight + B·A) gets a weight gradient in
    every backward, so it counts as trainable."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_ids = {id(p) for p in output.parameters()} if output is not None else set()
    wrappers = [m for m in model.modules() if hasattr(m, "parameter_name") and hasattr(m, "get_param")]
    adapted_ids = {id(m.get_param()) for m in wrappers}
    experts, per_token = routed_experts(getattr(model, "config", None))
    trainable = frozen = 0
    for name, p in model.named_parameters():  # tied parameters once
        if id(p) in embedding_ids and id(p) not in output_ids:
            continue
        quant_state = getattr(p, "quant_state", None)  # 4-bit weights are packed: count the logical shape
        # ZeRO-3 leaves an empty placeholder in the module and records the real size in ds_numel.
        numel = math.prod(quant_state.shape) if quant_state is not None else getattr(p, "ds_numel", p.numel())
        numel = active_numel(name, numel, experts, per_token)
        if p.requires_grad or id(p) in adapted_ids:
            trainable += numel
        else:
            frozen += numel
    return trainable, frozen


def train_flops_per_token(trainable: int, frozen: int, num_layers: int, hidden: int, context: float) -> float:
    """Forward 2 FLOPs per weight, backward 2 for the input gradient and 2 for the weight gradient, which
    frozen weights skip: 6·N_trainable + 4·N_frozen. Causal attention adds 6·L·d·T per token (QKᵀ and
    AV, forward and backward, over on average half of a context of T tokens)."""
    return 6 * trainable + 4 * frozen + 6 * num_layers * hidden * context


def measured_peak_flops(
    device: torch.device, dtype: torch.dtype, seconds: float = 0.3, matmul=None, trials: int = 5, clock=time.perf_counter
) -> float:
    """Dense matmul FLOP/s this device reaches in `dtype`, measured (no vendor table to go stale), by
    `matmul(a, b)` (a product of two n x n matrices; default `a @ b`): the best of `trials` short trials
    of `seconds / trials` each, so that a trial slowed by a neighbour on the cores (another job, a CI run)
    does not become the peak. Its random operands come from a generator of its own: the run's RNG state
    (restored from a checkpoint, driving dropout) must not move."""
    n = 4096 if device.type == "cuda" else 512
    matmul = matmul or torch.matmul
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        matmul(a, b)  # warm-up: kernels picked, clocks up
    _sync(device)
    best = 0.0
    for _ in range(max(1, trials)):
        count, start = 0, clock()
        while True:
            for _ in range(4):
                matmul(a, b)
            count += 4
            _sync(device)
            elapsed = clock() - start
            if elapsed >= seconds / max(1, trials):
                best = max(best, 2 * n**3 * count / elapsed)
                break
    return best


PEAK_CACHE = Path("~/.cache/sharpen/peak_flops.json")
# More threads measured slower than fewer by more than this fraction: the faster figure is believed,
# the slower one taken while the cores were busy, and measured again.
THREAD_SLOWDOWN_TOLERANCE = 0.1


def peak_cache_path(cache: Path | None = None) -> Path:
    """The cache file: `cache`, else $SHARPEN_PEAK_CACHE (a test hook, training/env_hooks.py), else
    ~/.cache/sharpen/peak_flops.json."""
    return Path(cache or os.environ.get(PEAK_CACHE_VAR) or PEAK_CACHE).expanduser()


def peak_flops(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> float:
    """measured_peak_flops, measured once per machine and kept in `cache` (keyed by the device's name, the
    dtype and torch's thread count, stamped with the torch build): its 0.3 s of trials would otherwise
    come before every run's first step. Measured again when the entry is from another torch build, when
    more threads read slower than fewer, or after a run found it too low (MFU above 1, forget_peak).
    Delete the file to measure again, e.g. after changing hardware under the same name. An fp32 CPU
    run's peak is that of the faster of its two matmul engines (cpu_engine_rates)."""
    if device.type == "cpu" and dtype == torch.float32:
        return max(cpu_engine_rates(cache).values())
    return cached_measure(str(dtype), device, lambda: measured_peak_flops(device, dtype), cache)


def cpu_engine_rates(cache: Path | None = None) -> dict[str, float]:
    """fp32 matmul FLOP/s of this CPU by each engine ({"aten": ..., "onednn": ...} where available),
    measured once per machine, thread count and torch build (kept in `cache`, as peak_flops)."""
    cpu = torch.device("cpu")
    measured = {"aten": lambda: measured_peak_flops(cpu, torch.float32)}
    if onednn_available():
        measured["onednn"] = lambda: measured_peak_flops(cpu, torch.float32, matmul=onednn_linear)
    return {name: cached_measure(f"fp32 gemm {name}", cpu, measure, cache) for name, measure in measured.items()}


def _peak_labels(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The cache labels peak_flops reads for this device and dtype."""
    if device.type == "cpu" and dtype == torch.float32:
        return [f"fp32 gemm {name}" for name in ("aten", "onednn")]
    return [str(dtype)]


def _key(label: str, device: torch.device, threads: int) -> str:
    return f"{_device_name(device)} | {label} | threads {threads}"


def torch_build() -> str:
    """This torch's version and the commit it was built from: an entry measured under another is stale."""
    return f"{torch.__version__} {getattr(torch.version, 'git_version', '') or ''}".strip()


def _torch_installed_at() -> float:
    """When this torch was installed (its version file's mtime): an entry measured before it is older
    than the build, even under the same version string (a rebuilt or reinstalled torch)."""
    try:
        return Path(torch.version.__file__).stat().st_mtime
    except (OSError, AttributeError, TypeError):
        return 0.0


def _rate(entry) -> float | None:
    """The FLOP/s of a cache entry measured under this torch build, or None (old format, another build,
    measured before this torch was installed, malformed)."""
    if not isinstance(entry, dict) or entry.get("torch") != torch_build():
        return None
    try:
        rate, measured_at = float(entry["flops"]), float(entry.get("measured_at", 0))
    except (KeyError, TypeError, ValueError):
        return None
    if not math.isfinite(rate) or rate <= 0 or measured_at < _torch_installed_at():
        return None
    return rate


def _inconsistent(known: dict, label: str, device: torch.device, threads: int, rate: float) -> bool:
    """True when fewer threads of the same device and label were measured faster than `rate` at `threads`
    (beyond THREAD_SLOWDOWN_TOLERANCE): more threads are never slower at one matmul, unless the cores
    were busy while it was timed."""
    for fewer in range(1, threads):
        other = _rate(known.get(_key(label, device, fewer)))
        if other is not None and rate < other * (1 - THREAD_SLOWDOWN_TOLERANCE):
            return True
    return False


def _read_cache(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or malformed: measured over and rewritten
    return known if isinstance(known, dict) else {}


def _write_cache(path: Path, known: dict) -> None:
    # Entries of the old format (a bare number under a key naming the torch version) are dropped.
    known = {k: v for k, v in known.items() if isinstance(v, dict)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        os.replace(tmp, path)  # ranks measuring at once each write a whole file; the last one stays
    except OSError:
        pass  # a read-only home: measured again next run


def cached_measure(label: str, device: torch.device, measure, cache: Path | None = None) -> float:
    """`measure()`, or what it returned before on this device with this thread count and torch build,
    unless that figure is inconsistent with fewer threads' (_inconsistent)."""
    threads = torch.get_num_threads()
    key = _key(label, device, threads)
    path = peak_cache_path(cache)
    known = _read_cache(path)
    rate = _rate(known.get(key))
    if rate is not None and not _inconsistent(known, label, device, threads, rate):
        return rate
    value = measure()
    _write_cache(path, {**known, key: {"flops": value, "torch": torch_build(), "measured_at": time.time()}})
    return value


def forget_peak(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> Path:
    """Drop the cached entries peak_flops read for this device, dtype and thread count (a run found the
    peak too low: MFU above 1), so that the next run measures them again. Returns the cache file."""
    path = peak_cache_path(cache)
    known = _read_cache(path)
    keys = {_key(label, device, torch.get_num_threads()) for label in _peak_labels(device, dtype)}
    if keys & known.keys():
        _write_cache(path, {k: v for k, v in known.items() if k not in keys})
    return path


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
