"""bench_grpo.py's baseline arm: one GRPO job through TRL's GRPOTrainer (HF generation), as TRL users run it.

    python bench/trl_grpo.py CONFIG.json

CONFIG names the model directory, the prompts JSONL (a `prompt` column of strings, and an `answer`
column the rewards read), the reward file and function names, the GRPO settings (num_generations,
max_completion_length, temperature, generation_kwargs, beta, loss), the batch (per_device_train_batch_size,
gradient_accumulation_steps), LoRA or full fine-tuning, the optimizer, thread count and an output directory.
The model goes to GRPOTrainer as a path (model_init_kwargs: fp32, sdpa) and LoRA as a `peft_config`, the
way TRL's documentation does it. Nothing of sharpen is imported.

Where a step's time goes is measured by subclassing GRPOTrainer and a callback (TRL's files are left as
they are), in the same four parts as sharpen's metrics.jsonl rows:
- generate: `_generate` (tokenize the prompts, `model.generate`, decode the completions);
- score: `_calculate_rewards` (the reward functions, called with TRL's arguments);
- update: `training_step` less the rollout it starts (the loss's forward and backward, micro-batch by
  micro-batch), then from the end of the last `training_step` to `on_optimizer_step` (clipping, AdamW);
- other: the rest of the step: the rest of `_generate_and_score_completions` (padding the completions
  into tensors, the group advantages, TRL's metrics), the dataloader, the scheduler, logging, callbacks.
The four add up to the step's wall time: from one `on_step_end` to the next (from `on_train_begin` for
the first step).

Writes OUT/steps.jsonl (one line per optimizer step as it ends: the harness watches it) and OUT/result.json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def load_rewards(path: str, names: list[str]) -> list:
    spec = importlib.util.spec_from_file_location("bench_grpo_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [getattr(module, name) for name in names]


def grpo_config(cfg: dict, out: Path):
    """The GRPOConfig of `cfg`. Every setting the comparison depends on is written out, not left to a default
    (TRL's own defaults differ from the Trainer's: gradient checkpointing on, bf16 on)."""
    from trl import GRPOConfig

    opt = cfg["optimizer"]
    return GRPOConfig(
        output_dir=str(out / "trainer"),
        model_init_kwargs={"dtype": "float32", "attn_implementation": cfg.get("attention", "sdpa")},
        per_device_train_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        # steps_per_generation defaults to gradient_accumulation_steps: one generation per optimizer step
        num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        top_p=1.0,
        top_k=0,
        generation_kwargs=cfg["generation_kwargs"],
        beta=cfg["beta"],
        loss_type=cfg["loss"],
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        mask_truncated_completions=False,
        max_steps=cfg["max_steps"],
        learning_rate=opt["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=opt["weight_decay"],
        adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1],
        adam_epsilon=opt["eps"],
        max_grad_norm=opt["max_grad_norm"],
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=cfg["device"] == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cfg["device"] != "cpu",
        seed=cfg["seed"],
    )


def build_trainer(cfg: dict, callbacks: list, phases: dict):
    """The GRPOTrainer of `cfg`, timing its phases into `phases` (seconds, summed over the current step)."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    out = Path(cfg["output_dir"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    train = datasets.load_dataset("json", data_files=cfg["prompts"], split="train")
    lora = cfg.get("lora")
    peft_config = None if lora is None else LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
    )

    def timed(key: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation, rewards and rollout timed (see the module docstring)."""

        def _generate(self, prompts):
            result = timed("generate", super()._generate, prompts)
            phases["completion_tokens"] = phases.get("completion_tokens", 0) + sum(len(c) for c in result[1])
            phases["completions"] = phases.get("completions", 0) + len(result[1])
            return result

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            return timed("reward_fn", super()._calculate_rewards, inputs, prompts, completions, completion_ids_list)

        def _generate_and_score_completions(self, inputs):
            return timed("rollout", super()._generate_and_score_completions, inputs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = timed("training_step", super().training_step, model, inputs, num_items_in_batch)
            phases["training_step_end"] = time.perf_counter()
            return loss

    return TimedGRPOTrainer(
        model=cfg["model"],
        reward_funcs=load_rewards(cfg["reward_file"], cfg["reward_functions"]),
        args=grpo_config(cfg, out),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def main(config_path: str) -> None:
    import torch
    from transformers import TrainerCallback

    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    steps_file = (out / "steps.jsonl").open("w")
    phases: dict = {}
    rows: list[dict] = []
    last = {"t": None}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            last["t"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            phases["optimizer_s"] = time.perf_counter() - phases["training_step_end"]

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_s = now - last["t"]
            last["t"] = now
            generate, score = phases.get("generate", 0.0), phases.get("reward_fn", 0.0)
            update = phases["training_step"] - phases.get("rollout", 0.0) + phases["optimizer_s"]
            row = {
                "step": state.global_step, "t": now - STARTED, "step_s": step_s,
                "generate_s": generate, "score_s": score, "update_s": update,
                "other_s": step_s - generate - score - update,
                "completion_tokens": phases.get("completion_tokens", 0), "completions": phases.get("completions", 0),
            }
            phases.clear()
            rows.append(row)
            steps_file.write(json.dumps(row) + "\n")
            steps_file.flush()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and rows and rows[-1]["step"] == state.global_step:
                rows[-1]["loss"] = logs["loss"]
                rows[-1]["reward"] = logs.get("reward")

    trainer = build_trainer(cfg, [StepClock()], phases)
    trainer.train()
    steps_file.close()
    result = {
        "steps": rows,
        "threads": torch.get_num_threads(),
        "seconds_in_process": time.perf_counter() - STARTED,
    }
    (out / "result.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
