"""What a model family's attention needs that the job's attention path does not do, refused before launch
(launcher/family_rules.py) through `sharpen plan` and `sharpen run`: config-only model dirs written from
transformers' config classes, one message and exit 2; the settings the messages give plan."""

from __future__ import annotations

import pytest
from support.e2e import ALPACA, base_job, write_job

from launcher.cli import main

SHAPE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
GEMMA3 = ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]})


def config_dir(tmp_path, config_class: str, fields: dict):
    """A model directory holding config.json alone (what `sharpen plan` reads)."""
    import transformers

    out = tmp_path / config_class
    getattr(transformers, config_class)(**{**SHAPE, **fields}).save_pretrained(out)
    return out


def plan(tmp_path, model_dir, capsys, command: str = "plan", **sections) -> tuple[int, str]:
    """`sharpen COMMAND JOB` in this process (the CLI's main): its exit code and stderr."""
    job = base_job(model_dir, ALPACA, **{"data": {"max_length": 64}, **sections})
    run_dir = tmp_path / "run"
    path = write_job(tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml", job)
    capsys.readouterr()
    code = main([command, str(path), "--output-dir", str(run_dir)])
    return code, capsys.readouterr().err


def refused(tmp_path, model_dir, capsys, command: str = "plan", **sections) -> str:
    code, err = plan(tmp_path, model_dir, capsys, command, **sections)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert [line for line in err.splitlines() if not line.startswith(("note:", "error:", "  hint:"))] == [], err
    assert not (tmp_path / "run" / "plan.json").exists()
    return err


def test_a_block_mask_under_a_sliding_window_is_refused_on_cuda(tmp_path, capsys):
    """Mistral attends within 16 tokens in every layer; sdpa on CUDA lays a micro-batch's samples under one block
    mask without a window. flash_attention_2, or samples no longer than the window, plan."""
    model = config_dir(tmp_path, "MistralConfig", {"sliding_window": 16})
    err = refused(tmp_path, model, capsys, device="cuda")
    assert (
        "error: model.attention: sdpa on CUDA lays several samples in a row under one block mask, which has no "
        "sliding window, but MistralForCausalLM attends within a window of 16 tokens (2 of its 2 layers) and "
        "samples may be 64 tokens long" in err
    ), err
    assert "hint: set model.attention: flash_attention_2 (it keeps each sample's window); or data.max_length: 16" in err
    assert "train.micro_batch_size: 1 with data.packing: false" in err
    assert plan(tmp_path, model, capsys, device="cuda", model={"attention": "flash_attention_2"})[0] == 0
    assert plan(tmp_path, model, capsys, device="cuda", data={"max_length": 16})[0] == 0
    assert plan(tmp_path, model, capsys, device="cuda", train={"micro_batch_size": 1})[0] == 0  # one sample a row


def test_eager_under_gemma3s_sliding_layers_is_refused_and_sdpa_on_the_cpu_plans(tmp_path, capsys):
    model = config_dir(tmp_path, *GEMMA3)
    err = refused(tmp_path, model, capsys, model={"attention": "eager"}, data={"packing": True})
    assert "eager on the CPU lays several samples" in err, err
    assert "Gemma3ForCausalLM attends within a window of 16 tokens (1 of its 2 layers)" in err, err
    assert "hint: set model.attention: sdpa with data.padding_free: true (each sample runs with its window)" in err
    assert plan(tmp_path, model, capsys, data={"packing": True})[0] == 0  # the per-sample kernel's windows


def test_sharpen_run_refuses_it_before_a_rank_starts(tmp_path, capsys):
    """A real tiny Gemma 3 (weights and tokenizer), as `sharpen run` gets it."""
    from training.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "gemma3", "gemma3")  # sliding window 8
    err = refused(tmp_path, model, capsys, command="run", model={"attention": "eager"})
    assert "Gemma3ForCausalLM attends within a window of 8 tokens" in err, err
    assert not (tmp_path / "run" / "logs").exists()


def test_soft_capped_attention_logits_are_refused_under_sdpa(tmp_path, capsys):
    """Gemma 2 caps its attention logits (50 by default): sdpa has no cap; eager has, and plans."""
    model = config_dir(tmp_path, "Gemma2Config", {"head_dim": 16, "sliding_window": 64})
    err = refused(tmp_path, model, capsys)
    assert "error: model.attention: sdpa cannot soft-cap attention logits, and Gemma2ForCausalLM caps them at 50" in err
    assert "hint: set model.attention: eager" in err
    assert "flash_attention_2" in refused(tmp_path, model, capsys, device="cuda")  # flash-attn caps them too
    assert plan(tmp_path, model, capsys, model={"attention": "eager"})[0] == 0


@pytest.mark.parametrize(
    ("config_class", "fields", "job", "message"),
    [
        # Gemma 2 without its cap: transformers still has no sdpa for it
        ("Gemma2Config", {"head_dim": 16, "attn_logit_softcapping": None}, {},
         "model.attention: Gemma2ForCausalLM has no sdpa attention in transformers"),
        ("BloomConfig", {"n_embed": 64, "n_layer": 2, "n_head": 4}, {"device": "cuda", "model": {"attention": "flash_attention_2"}},
         "model.attention: BloomForCausalLM has no flash_attention_2 in transformers"),
        # StableLM's layers do not pass the per-sample kernel's segments on to its attention
        ("StableLmConfig", {}, {},
         "StableLmForCausalLM's layers do not pass them on, so its samples would attend to each other"),
    ],
    ids=["gemma2-sdpa", "bloom-flash", "stablelm-per-sample"],
)
def test_attention_a_models_class_does_not_run_is_refused(tmp_path, capsys, config_class, fields, job, message):
    err = refused(tmp_path, config_dir(tmp_path, config_class, fields), capsys, **job)
    assert message in err, err


def test_stablelm_with_one_sample_a_row_plans(tmp_path, capsys):
    model = config_dir(tmp_path, "StableLmConfig", {})
    assert plan(tmp_path, model, capsys, train={"micro_batch_size": 1})[0] == 0
    assert plan(tmp_path, model, capsys, model={"attention": "eager"})[0] == 0


MIXTRAL = ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None})
LORA = {"type": "lora", "r": 4, "alpha": 8}


def test_router_settings_of_a_model_without_experts_are_refused(tmp_path, capsys):
    err = refused(tmp_path, config_dir(tmp_path, "LlamaConfig", {}), capsys, model={"router_aux_loss_coef": 0.01})
    assert "error: model.router_aux_loss_coef: llama has no router (not a mixture-of-experts model); remove the key" in err
    moe = config_dir(tmp_path, *MIXTRAL)
    assert plan(tmp_path, moe, capsys, model={"router_aux_loss_coef": 0.01})[0] == 0


def test_lora_target_names_are_checked_against_the_layers(tmp_path, capsys):
    """A typo in target_modules is named with the layers there are, before PEFT fails on every rank; the
    experts of an MoE model are a target, and the two things PEFT cannot do to them are refused."""
    dense = config_dir(tmp_path, "LlamaConfig", {})
    err = refused(tmp_path, dense, capsys, finetune={**LORA, "target_modules": ["q_proj", "v_prj"]})
    assert "error: finetune.target_modules: 'v_prj' names no layer of llama LoRA can adapt; its layers are " in err
    assert "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj, or use all-linear" in err
    assert "experts" not in err
    moe = config_dir(tmp_path, *MIXTRAL)
    err = refused(tmp_path, moe, capsys, finetune={**LORA, "target_modules": ["q_proj", "experts"], "dropout": 0.05})
    assert (
        "error: finetune.dropout: 0.05 with LoRA on the experts: PEFT cannot apply dropout to them (target_modules "
        "names the experts' 3D weights (experts.down_proj, experts.gate_up_proj)); set finetune.dropout: 0, or "
        "leave the experts out of target_modules" in err
    )
    err = refused(tmp_path, moe, capsys, finetune={**LORA, "target_modules": ["experts"], "use_dora": True})
    assert "error: finetune.use_dora: PEFT has no DoRA for the experts' weights" in err
    err = refused(tmp_path, moe, capsys, finetune={**LORA, "dropout": 0.1})  # all-linear reaches the experts
    assert (
        "error: finetune.dropout: 0.1 with LoRA on the experts: PEFT cannot apply dropout to them (all-linear "
        "reaches the experts' 3D weights and the routers); set finetune.dropout: 0, or name only linear layers "
        "in target_modules, e.g. [q_proj, k_proj, v_proj, o_proj]" in err
    )
    assert plan(tmp_path, moe, capsys, finetune={**LORA, "target_modules": ["q_proj", "experts"]})[0] == 0
    assert plan(tmp_path, moe, capsys, finetune={**LORA, "target_modules": ["q_proj"], "dropout": 0.05})[0] == 0


def test_router_settings_for_a_method_without_the_router_loss_are_refused(tmp_path, capsys):
    moe = config_dir(tmp_path, *MIXTRAL)
    prefs = ALPACA.parent / "preference_tiny.jsonl"
    err = refused(
        tmp_path, moe, capsys, model={"router_aux_loss_coef": 0.01}, method={"kind": "dpo"},
        data={"train": [{"path": str(prefs), "format": "preference"}], "max_length": 64},
    )
    assert "error: model.router_aux_loss_coef: method dpo trains without the router's load-balancing loss" in err
