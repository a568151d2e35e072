"""A LoRA reward model's final/: a PEFT adapter (task SEQ_CLS) carrying its score head, which scores as
the training model did (in one process)."""

from __future__ import annotations

import json

import torch
from support import preference_jobs
from support.preference_jobs import PREFS, reward_job

from launcher.spec import JobSpec
from training.data.packing import collate
from training.methods.reward import RewardLoss

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model


def test_lora_reward_model_exports_an_adapter_with_its_head(tiny_model, tmp_path):
    """LoRA: final/ is a PEFT adapter (task SEQ_CLS) carrying the trained score head; loaded over the base
    with transformers and PEFT, it scores each sequence alone as the training model scored it packed."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from launcher.spec import DataSpec
    from strategies.base import DistEnv, StrategyOptions
    from strategies.single import SingleStrategy
    from training.data.cache import load_prepared
    from training.data.prepare import prepare_dataset
    from training.export import write_final
    from training.model import load_model, load_tokenizer

    spec = JobSpec.model_validate(reward_job(tiny_model, tmp_path / "cache", finetune="lora"))
    model = load_model(spec, "fp32", torch.device("cpu"))
    torch.manual_seed(1)
    for param in (p for p in model.parameters() if p.requires_grad):  # as if trained: adapter and head move
        param.data += 0.05 * torch.randn_like(param)
    strategy = SingleStrategy(StrategyOptions(), DistEnv())
    strategy.setup(
        model,
        lambda params: torch.optim.AdamW(params),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    )
    write_final(strategy, load_tokenizer(spec), tmp_path / "final", peft=True)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    data = DataSpec(train=[{"path": str(PREFS), "format": "preference"}], max_length=96)
    rows = [
        load_prepared(prepare_dataset(data, "reward", str(tiny_model), cache_root=tmp_path / "cache"))[i]
        for i in range(3)
    ]
    with torch.no_grad():
        packed, _ = RewardLoss().rewards(model.eval(), collate(rows))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    loaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    alone = []
    for row in rows:
        cut = row["segment_lengths"][0]
        for ids in (row["input_ids"][:cut], row["input_ids"][cut:]):
            with torch.no_grad():
                alone.append(loaded(input_ids=torch.tensor([ids])).logits.item())
    torch.testing.assert_close(packed, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert packed[0::2].sub(packed[1::2]).abs().max() > 1e-3, "rewards do not depend on the answer"
