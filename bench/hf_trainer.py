"""The baseline arm of the benchmarks: one job through Hugging Face Trainer + PEFT, as HF-based tools run it.

    python bench/hf_trainer.py CONFIG.json

CONFIG names the model, a dataset on disk (input_ids, attention_mask, labels; rows already in the order
to train them), the LoRA and optimizer settings and an output directory. The Trainer reads the rows with
a SequentialSampler and pads each batch with DataCollatorForSeq2Seq (labels -100 on prompt and padding).
Optimizer and LR schedule are passed in, built exactly as sharpen builds them (AdamW, sharpen's warmup +
cosine lambda), so the two loss curves can be compared step for step.

Writes OUT/steps.jsonl (one line per optimizer step, as it happens: the harness watches it for the first
step) and OUT/result.json (per-step losses and times).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """sharpen's LR multiplier (training/loop.py), copied so this arm imports nothing of sharpen."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def build_trainer(cfg: dict, callbacks: list):
    """The Trainer for `cfg` (see the module docstring); its `step_losses` fill as it trains."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    # "fp32" (the CPU bench) or "bf16": the frozen base in bf16 and the forward under bf16 autocast
    # (bf16=True); PEFT keeps the adapters in fp32 (autocast_adapter_dtype), as sharpen does.
    bf16 = cfg.get("dtype", "fp32") == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model"], dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=cfg.get("attention", "sdpa")
    )
    model.config.use_cache = False
    lora = cfg["lora"]
    torch.manual_seed(cfg["seed"])  # sharpen seeds right before get_peft_model too: the same adapter init
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
        ),
    )
    train = datasets.load_from_disk(cfg["dataset"])

    opt = cfg["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"]
    )
    factor = lr_lambda(opt["lr_scheduler"], opt["warmup_steps"], cfg["max_steps"], opt["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    args = TrainingArguments(
        output_dir=str(Path(cfg["output_dir"]) / "trainer"),
        per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=1,
        max_steps=cfg["max_steps"],
        max_grad_norm=opt["max_grad_norm"],
        logging_steps=cfg["log_every"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=cfg["device"] == "cpu",
        bf16=bf16,
        dataloader_num_workers=0,
        dataloader_pin_memory=cfg["device"] != "cpu",
        train_sampling_strategy="sequential",
        label_names=["labels"],
        seed=cfg["seed"],
    )

    class LossRecordingTrainer(Trainer):
        """Trainer that keeps each step's loss (a detached tensor: no extra host sync) unrounded."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss)
            return loss

    trainer = LossRecordingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )
    trainer.step_losses = []
    return trainer


def main(config_path: str) -> None:
    import torch
    from transformers import TrainerCallback

    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    steps_file = (out / "steps.jsonl").open("w")
    step_times: list[float] = []

    sync = cfg["device"] != "cpu" and torch.cuda.is_available()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if sync:  # the step's kernels done, as sharpen's logged rows are (one host sync a step, both arms)
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_times.append(now - STARTED)
            steps_file.write(json.dumps({"step": state.global_step, "t": now - STARTED}) + "\n")
            steps_file.flush()

    trainer = build_trainer(cfg, [StepClock()])
    trainer.train()
    cuda = cfg["device"] != "cpu" and torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else None  # training only, before saving
    trainer.save_model(str(out / "final"))
    steps_file.close()
    result = {
        "losses": [float(x) for x in trainer.step_losses],
        "step_times": step_times,
        "threads": torch.get_num_threads(),
        "seconds_in_process": time.perf_counter() - STARTED,
        "peak_memory_gib": peak,
    }
    (out / "result.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
