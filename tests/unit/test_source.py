"""launcher/source.py: what SOURCE is, found from its files before anything loads, and a model dir with a
PEFT adapter (modules_to_save included) loaded as it was saved."""

from __future__ import annotations

import pytest
import torch

from launcher.errors import UserError
from launcher.source import check_source, format_prompt, load_source


def test_a_source_that_is_nothing_known_is_one_message_naming_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: is not a run dir \(plan.json\), an export dir .* or a hub id"):
        check_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such directory, and not a hub id"):
        check_source(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is not a run dir"):
        check_source(str(tmp_path / "empty"), checkpoint="step-4")
    with pytest.raises(UserError, match="not a PEFT adapter dir"):
        check_source("org/model", adapter=str(tmp_path / "empty"))
    assert check_source("org/model").describe == "hub model org/model"


def test_a_model_dir_loads_in_eval_mode_with_its_chat_template(tiny_model):
    from training.tiny import CHAT_TEMPLATE

    source = load_source(str(tiny_model), device="cpu")
    assert not source.model.training and source.run_dir is None
    assert source.chat_template == CHAT_TEMPLATE
    assert source.describe == f"{tiny_model} (model dir) on cpu, fp32"
    assert format_prompt(source, "Hi") == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_an_adapter_with_modules_to_save_loads_as_it_was_trained(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head", "embed_tokens"])
    trained = get_peft_model(base, config)
    with torch.no_grad():  # as if trained: every adapter weight and the saved modules moved
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    want = trained.eval()(input_ids=ids).logits

    source = load_source(str(tiny_model), adapter=str(tmp_path / "adapter"), device="cpu")
    assert torch.allclose(source.model(input_ids=ids).logits, want, atol=1e-5)
    plain = load_source(str(tiny_model), device="cpu").model(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-2)  # the adapter changed what the model says
    # The adapter dir alone as SOURCE: the base named in its adapter_config.json.
    alone = load_source(str(tmp_path / "adapter"), device="cpu")
    assert torch.allclose(alone.model(input_ids=ids).logits, want, atol=1e-5)
    assert "(adapter, over" in alone.describe


def test_a_run_dir_is_refused_when_it_cannot_generate_or_has_no_such_checkpoint(tmp_path):
    import json

    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    plan = {"job": {"model": {"path": "org/base"}, "finetune": {"type": "lora"}, "method": {"kind": "sft"}}}
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match=r"run: no final/ \(the run has not finished\)"):
        check_source(str(run))
    with pytest.raises(UserError, match="step-9 does not exist\n  hint: checkpoints: step-2"):
        check_source(str(run), checkpoint="9")
    assert check_source(str(run), checkpoint="2").describe == f"{run} checkpoint step-2 (lora on org/base)"
    plan["job"]["method"]["kind"] = "reward"
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="a reward model run: it scores text, it does not generate it"):
        check_source(str(run))
