"""End to end: a job whose data.train sources are weighted trains, on 2 ranks, on exactly the mix's draws."""

from __future__ import annotations

import json

import numpy as np
from support.e2e import ALPACA, assert_ok, base_job, metrics, sharpen, write_job
from support.run_job import two_ranks

from training.data import cache as C
from training.data import sampler as S


def test_two_ranks_train_on_the_mix(tiny_model, tmp_path):
    second = tmp_path / "second.jsonl"
    second.write_text("".join(
        json.dumps({"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(i % 9 + 1))})
        + "\n" for i in range(30)
    ))
    weights = [0.25, 0.75]
    job = base_job(tiny_model, ALPACA, **two_ranks("ddp"),
                   data={"train": [{"path": str(ALPACA), "weight": weights[0]},
                                   {"path": str(second), "weight": weights[1]}],
                         "max_length": 128, "cache_dir": str(tmp_path / "cache")})
    run_dir = tmp_path / "run"
    assert_ok(sharpen("run", str(write_job(tmp_path / "job.yaml", job)), "--output-dir", str(run_dir)))
    rows = [r for r in metrics(run_dir) if "loss" in r]
    cache = json.loads((run_dir / "plan.json").read_text())["data_cache"]
    lengths = np.asarray(C.load_prepared(cache).with_format("arrow")["length"])
    mix = S.prepared_mix(cache, weights)
    mixed = np.cumsum([lengths[mix.step_rows(k, 8, 0, True)].sum() for k in range(len(rows))])
    pooled = np.cumsum([lengths[S.epoch_order(len(lengths), 0, 0)[8 * k : 8 * k + 8]].sum() for k in range(len(rows))])
    assert len(rows) == 4 and [r["tokens"] for r in rows] == mixed.tolist() != pooled.tolist()
    second_share = np.mean([np.mean(mix.step_rows(k, 8, 0, True) >= mix.rows[0]) for k in range(4)])
    assert second_share == 0.75  # 30 records at 0.75 against the example file's at 0.25: 6 of each step's 8
