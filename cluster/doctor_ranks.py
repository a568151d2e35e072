"""The process side of `sharpen doctor`: package probes, and the all-reduce test's agent and ranks.

    python -m cluster.doctor_ranks probe MODULE...  # import each MODULE, print one JSON line about each
    python -m cluster.doctor_ranks launch TEST_DIR  # elastic agent: start the ranks of TEST_DIR/config.json
    python -m cluster.doctor_ranks rank TEST_DIR    # one rank (the agent starts these): time the all-reduces

Each runs in its own process so that a package that crashes on import, or a collective that hangs, is
one FAIL line in the doctor's report rather than the doctor's own end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

CONFIG, RESULT = "config.json", "result.json"
# Rank r contributes (i % PATTERN + 1) * (r + 1) at element i: every sum is an exact float32 integer,
# and a chunk reduced into the wrong place shows up as a wrong value.
PATTERN = 251


def probe(module: str) -> dict:
    """Import `module` and say what it is: version, and for torch its build and the visible GPUs."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return {"missing": True}
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 (any import failure is the finding)
        return {
            "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        }
    info: dict = {"version": getattr(mod, "__version__", "unknown")}
    if module == "torch":
        info["cuda"] = mod.version.cuda
        info["nccl"] = ".".join(map(str, mod.cuda.nccl.version())) if mod.version.cuda else None
        info["gpus"] = []
        if mod.cuda.is_available():
            for i in range(mod.cuda.device_count()):
                free, total = mod.cuda.mem_get_info(i)
                info["gpus"].append({"name": mod.cuda.get_device_name(i), "free": free, "total": total})
    return info


def launch(test_dir: Path) -> int:
    """Start config["nproc"] ranks here through torch's elastic agent, c10d rendezvous on 127.0.0.1."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from cluster.environment import free_port
    from cluster.local import worker_environment

    config = json.loads((test_dir / CONFIG).read_text())
    os.environ.update(worker_environment(config["device"], config["nproc"]))
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config["nproc"],
        run_id=f"doctor-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"join_timeout": config["timeout_s"], "is_host": True},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(test_dir / "agent")),
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)(
            "-m", "cluster.doctor_ranks", "rank", str(test_dir)
        )
    except ChildFailedError:
        return 1
    return 0


def rank(test_dir: Path) -> int:
    """Check one all-reduce's values, then time config["iters"] all-reduces of config["bytes"] each.
    Rank 0 writes the slowest rank's time (what the collective cost) and the count of wrong values."""
    local_rank = int(os.environ["LOCAL_RANK"])
    (test_dir / f"rank-{local_rank}.pid").write_text(str(os.getpid()))
    try:
        run_rank(test_dir, local_rank)
    except Exception:
        (test_dir / f"rank-{local_rank}.error").write_text(traceback.format_exc())
        raise
    return 0


def run_rank(test_dir: Path, local_rank: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    config = json.loads((test_dir / CONFIG).read_text())
    cuda = config["backend"] == "nccl"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        config["backend"], timeout=timedelta(seconds=config["timeout_s"]), device_id=device if cuda else None
    )
    rank, world = dist.get_rank(), dist.get_world_size()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    pattern = torch.arange(config["bytes"] // 4, device=device, dtype=torch.int64).remainder_(PATTERN).add_(1)
    buffer = pattern.to(torch.float32).mul_(rank + 1)
    dist.all_reduce(buffer)  # also the warm-up: connections and NCCL communicators are set up here
    wrong = (buffer != pattern.to(torch.float32).mul_(world * (world + 1) // 2)).sum().to(torch.float64)
    del pattern
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(config["iters"]):
        dist.all_reduce(buffer)
    sync()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.all_reduce(wrong)
    if rank == 0:
        result = {
            "world": world,
            "seconds": elapsed.item(),
            "wrong": int(wrong.item()),
            "elements": buffer.numel(),
        }
        tmp = test_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, test_dir / RESULT)
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "probe":
        for module in argv[1:]:  # one process: torch, imported by most of them, is loaded once
            print(json.dumps({"module": module, **probe(module)}), flush=True)
        return 0
    if len(argv) == 2 and argv[0] in ("launch", "rank"):
        return (launch if argv[0] == "launch" else rank)(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
