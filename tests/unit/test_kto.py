"""KTO in one process: feedback rows, the KL pairs of a step, the loss and its reference point against a
hand computation, and bad feedback data refused before a rank starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import preference_jobs
from support.e2e import sharpen, write_job
from support.feedback_jobs import kto_job, preference_records, write_feedback
from support.preference_jobs import alone

from launcher.errors import UserError
from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.packing import DESIRABLE, IGNORE_INDEX, collate
from training.methods.kto import KTOLoss, kto_losses
from training.methods.kto_pairs import kl_micro_batches

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache


def prepared(model_dir: Path, cache: Path, path: Path, **data):
    spec = DataSpec(train=[{"path": str(path), "format": "feedback"}], max_length=96, **data)
    return C.load_prepared(D.prepare_dataset(spec, "kto", str(model_dir), cache_root=cache))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> Path:
    return write_feedback(tmp_path_factory.mktemp("feedback") / "feedback.jsonl", preference_records()[:12])


# ---------------------------------------------------------------- data


def test_a_feedback_record_is_one_row_with_its_label_and_the_prompt_masked(tiny_model, cache, feedback):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ds = prepared(tiny_model, cache, feedback)
    records = [json.loads(line) for line in feedback.read_text().splitlines()]
    assert len(ds) == len(records) == 24 and ds[DESIRABLE] == [r["label"] for r in records] == [True, False] * 12
    for row, record in zip(ds, records, strict=True):
        assert row["num_segments"] == 1 and row["segment_lengths"] == [row["length"]]
        assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == record["prompt"] + record["completion"]
        assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == record["completion"] + "</s>"


def test_chat_prompts_use_the_chat_template(tiny_model, cache, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Give the opposite.\nhot"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "completion": "cold", "label": True}] * 2)
    row = prepared(tiny_model, cache, path)[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nGive the opposite.\nhot<|end|>\n<|assistant|>\ncold<|end|>\n</s>"
    )
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "cold<|end|>\n</s>"
    assert row[DESIRABLE] is True


def test_kl_pairs_are_each_prompt_with_the_next_rows_completion_shared_across_ranks(tiny_model, cache, feedback):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ds = prepared(tiny_model, cache, feedback)
    records = [json.loads(line) for line in feedback.read_text().splitlines()]
    rows = [5, 0, 17, 2, 9, 12, 3, 20]  # a step's global order
    texts = {}
    for world in (1, 2, 4):
        seen, counts = [], []
        for rank in range(world):
            micro = list(kl_micro_batches(ds, rows, rank=rank, world_size=world, micro_batch_size=2, max_length=96))
            counts.append(len(micro))
            for batch, real in micro:
                assert real
                starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist() + [batch.input_ids.shape[1]]
                for lo, hi in zip(starts, starts[1:], strict=False):
                    ids, labels = batch.input_ids[0, lo:hi].tolist(), batch.labels[0, lo:hi].tolist()
                    seen.append((tokenizer.decode(ids, skip_special_tokens=True),
                                 tokenizer.decode([t for t in labels if t != IGNORE_INDEX])))
        assert len(set(counts)) == 1  # every rank joins as many forwards
        texts[world] = sorted(seen)
    want = sorted(
        (records[r]["prompt"] + records[rows[(j + 1) % 8]]["completion"], records[rows[(j + 1) % 8]]["completion"] + "</s>")
        for j, r in enumerate(rows)
    )
    assert texts[1] == texts[2] == texts[4] == want
    # An evaluation set that does not fill the last chunk: a throwaway micro-batch where a rank has none.
    tail = list(kl_micro_batches(ds, rows[:5], rank=1, world_size=2, micro_batch_size=2, max_length=96))
    assert [real for _, real in tail] == [True, False]


# ---------------------------------------------------------------- the loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))




class OneRank:
    """The strategy surface KTOLoss's no-grad pass uses, for one process."""

    def __init__(self, model):
        from types import SimpleNamespace

        self.model = model
        self.env = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
        self.options = SimpleNamespace(compute_dtype=torch.float64)

    def forward_context(self):
        from contextlib import nullcontext

        return nullcontext()

    def all_reduce_sum(self, tensor):
        return tensor


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.6)])
@pytest.mark.parametrize("adapter_scale", [0.02, -0.02])  # z0 above 0, and clamped at 0 (the KL's sign flipped)
def test_kto_loss_of_a_step_equals_the_hand_computation(tiny_model, cache, feedback, weights, adapter_scale):
    """A step of 6 rows in 3 micro-batches, LoRA with a random adapter against the base model loaded
    separately, every sequence and every KL pair run alone: loss, rewards and z0 agree to 1e-6."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.data.sampler import StepBatch
    from training.methods.dpo_reference import AdapterDisabledReference
    from training.methods.kto_pairs import kl_pair

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64), config)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(adapter_scale)
    ds = prepared(tiny_model, cache, feedback)
    rows = np.array([7, 2, 10, 5, 13, 0])  # three desirable (even rows: chosen), three not
    beta, (dw, uw) = 0.5, weights
    loss = KTOLoss(AdapterDisabledReference(policy), beta, dw, uw, desirable=np.asarray(ds[DESIRABLE]),
                   train_ds=ds, max_length=96, micro_batch_size=2)
    micro = []
    for k in range(3):
        batch = collate([ds[int(r)] for r in rows[2 * k : 2 * k + 2]])
        batch.row_ids = [int(r) for r in rows[2 * k : 2 * k + 2]]
        micro.append(batch)
    loss.prepare_step(OneRank(policy), StepBatch(micro, 0, 0, 6, 0, step=0, global_rows=6, rows=rows))
    outs = [loss(policy, batch) for batch in micro]

    def logratio(ids, labels):
        return alone(policy, ids, labels)[0] - alone(base, ids, labels)[0]

    kl = []
    for j, r in enumerate(rows):
        nxt = ds[int(rows[(j + 1) % 6])]
        pair = kl_pair(ds[int(r)]["input_ids"], ds[int(r)]["labels"], nxt["input_ids"], nxt["labels"], 96)
        kl.append(logratio(pair["input_ids"], pair["labels"]))
    z0 = max(0.0, sum(kl) / 6)
    assert (z0 > 0) == (adapter_scale > 0), kl  # the two cases are what they say
    want_loss = want_chosen = want_rejected = 0.0
    for r in rows:
        h = logratio(ds[int(r)]["input_ids"], ds[int(r)]["labels"])
        if ds[int(r)][DESIRABLE]:
            want_loss += dw * (1 - sigmoid(beta * (h - z0)))
            want_chosen += beta * h / 3
        else:
            want_loss += uw * (1 - sigmoid(beta * (z0 - h)))
            want_rejected += beta * h / 3
    got = {name: sum(out.metric_sums[name].item() for out in outs) / 6 for name in outs[0].metric_sums}
    got_loss = sum(out.loss_sum.item() for out in outs)
    assert math.isclose(got_loss, want_loss, rel_tol=1e-6), (got_loss, want_loss)
    assert math.isclose(got["kl"], z0, rel_tol=1e-6, abs_tol=1e-9), (got["kl"], z0)
    assert math.isclose(got["rewards/chosen"], want_chosen, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(got["rewards/rejected"], want_rejected, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(got["rewards/margin"], want_chosen - want_rejected, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(got["loss/desirable"] + got["loss/undesirable"], got_loss / 6, rel_tol=1e-6)
    assert all(out.loss_sum.requires_grad for out in outs) and not loss.z0.requires_grad


def test_kto_losses_follow_trl_at_fixed_values():
    """The formula on numbers: z0 is subtracted for desirable completions, added for undesirable ones."""
    policy = torch.tensor([-3.0, -5.0, -2.0], dtype=torch.float64)
    reference = torch.tensor([-4.0, -4.5, -2.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_losses(policy, reference, desirable, 0.2, 0.1, 2.0, 0.5)
    want = [2.0 * (1 - sigmoid(0.1 * (1.0 - 0.2))), 0.5 * (1 - sigmoid(0.1 * (0.2 + 0.5))),
            0.5 * (1 - sigmoid(0.1 * (0.2 - 0.5)))]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.1, -0.05, 0.05], rel=1e-12)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "2+2? ", "completion": "5"}', r"record 3 \(line 3\): field 'label' is missing"),
        ('{"prompt": "2+2? ", "completion": "5", "label": "no"}',
         r"record 3 \(line 3\): field 'label' must be true or false \(a JSON boolean\), got the string 'no'"),
        ('{"prompt": "2+2? ", "completion": "5", "label": 0}', r"record 3 \(line 3\): field 'label' must be true or"),
    ],
)
def test_bad_labels_are_one_clear_error_with_the_record(tiny_model, tmp_path, line, message):
    good = '{"prompt": "2+2? ", "completion": "4", "label": true}'
    path = write_jsonl(tmp_path / "feedback.jsonl", [good, good, line, good])
    with pytest.raises(UserError, match=r"data.train\[0\] \(.*feedback.jsonl\): " + message) as err:
        prepared(tiny_model, tmp_path / "c", path)
    assert '"label": true' in err.value.hint


def test_feedback_without_labels_exits_2_before_any_rank(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "feedback.jsonl", [{"prompt": "2+2? ", "completion": "4"}] * 8)
    job = kto_job(tiny_model, tmp_path / "cache", path, "lora", "single", 1)
    result = sharpen("run", str(write_job(tmp_path / "job.yaml", job)), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "no field 'label'" in result.stderr and "Traceback" not in result.stderr
    assert '"label": true' in result.stderr  # the hint: a valid record
    assert not (tmp_path / "run" / "logs").exists(), "no rank may start on bad data"


def test_kto_plan_names_its_reference():
    from launcher.planner import reference_model
    from launcher.spec import JobSpec

    for finetune, source in (("lora", "adapter_disabled"), ("full", "precomputed")):
        spec = JobSpec.model_validate({
            "model": {"path": "example-org/tiny-llama"}, "finetune": {"type": finetune},
            "method": {"kind": "kto"}, "data": {"train": [{"path": "f.jsonl", "format": "feedback"}]},
        })
        plan = reference_model(spec)
        assert plan["source"] == source and "KL pairs" in plan["compute"], plan
