"""The baseline of bench/startup.py: a bare script that does what `sharpen run` does up to its first step.

    python bench/bare_first_step.py CONFIG.json

One process: import torch, transformers and peft; load the model (fp32, sdpa); wrap it in LoRA with the
same settings and seed as sharpen; read the first batch sharpen trains on (saved by the bench: the
packed row, its position ids and block-causal mask, labels already shifted); one forward, the same
summed cross-entropy over label tokens divided by their count, backward, clip, torch AdamW at the
first step's learning rate, step. Nothing else (no tokenizing: the bench hands it sharpen's tokens,
as sharpen's own run hits its tokenization cache).

Writes OUT/result.json with time.time() stamps (the same clock the bench starts its timer on) at
the script's first line, after the imports, after the model is loaded and wrapped, and at the end of
the optimizer step, plus the step's loss.
"""

from __future__ import annotations

import time

T_START = time.time()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main(config_path: str) -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    t_imported = time.time()
    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    lora = cfg["lora"]
    torch.manual_seed(cfg["seed"])
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
        ),
    )
    model.train()
    t_loaded = time.time()

    batch = torch.load(cfg["batch"])
    opt = cfg["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"]
    )
    out = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
        use_cache=False,
    )
    logits = out.logits
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), batch["labels"].reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss = loss_sum / int((batch["labels"] != -100).sum())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt["max_grad_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t_step = time.time()

    result = {
        "t_start": T_START, "t_imported": t_imported, "t_loaded": t_loaded, "t_first_step": t_step,
        "loss": float(loss), "threads": torch.get_num_threads(),
    }
    Path(cfg["output"]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
