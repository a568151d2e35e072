"""One CPU matmul engine per job: two ranks whose cached rates disagree both run rank 0's (gloo)."""

from __future__ import annotations

import pytest
import torch
from support.dist_harness import run, unwrap
from support.onednn import needs_onednn

from training.kernels import cpu_gemm, resolve_cpu_matmul


def agree_with_own_cache(env, cache_dir: str, rates_by_rank: list[dict[str, float]]) -> tuple[str, str, str]:
    """On one rank: (the engine its own cache picks, the engine the job agrees on, the one set here). Each
    rank's matmul rates are its own (a machine of its own), measured into a cache of its own."""
    from pathlib import Path

    from training import flops
    from training.kernels import agree_cpu_matmul

    rates = rates_by_rank[env.rank]
    flops.measured_peak_flops = lambda device, dtype, seconds=0.3, matmul=None: rates[
        "onednn" if matmul is cpu_gemm.onednn_linear else "aten"
    ]
    cache = Path(cache_dir) / f"rank{env.rank}.json"
    alone = resolve_cpu_matmul("auto", "cpu", "fp32", torch.get_num_threads(), cache)
    agreed = agree_cpu_matmul(None, "auto", "fp32", env, cache)
    return alone, agreed, cpu_gemm.current_engine()


FASTER_ONEDNN, FASTER_ATEN = {"aten": 1e11, "onednn": 2.2e11}, {"aten": 2e11, "onednn": 1e11}


@needs_onednn
@pytest.mark.parametrize(
    "rank0,rank1", [(FASTER_ONEDNN, FASTER_ATEN), (FASTER_ATEN, FASTER_ONEDNN)], ids=["rank0-onednn", "rank0-aten"]
)
def test_two_ranks_whose_caches_disagree_run_rank_0s_engine(tmp_path, rank0, rank1):
    """Two machines of one job, each with its own cached rates: alone they would pick different engines;
    the job runs one, rank 0's, on both (broadcast over gloo)."""
    results = unwrap(run(agree_with_own_cache, 2, str(tmp_path), [rank0, rank1]))
    want = cpu_gemm.faster_engine(rank0)
    assert [alone for alone, _, _ in results] == [want, cpu_gemm.faster_engine(rank1)] != [want, want]
    assert [(agreed, set_here) for _, agreed, set_here in results] == [(want, want), (want, want)]
