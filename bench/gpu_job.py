"""The GPU bench's job (bench/bench_gpu.py): the ~1.1B Llama, its synthetic text, the job file, the rows
sharpen trains on in its order, and the FLOPs a token of them costs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from bench import arms

REPO = Path(__file__).resolve().parent.parent

SEQ = 2048
# TinyLlama's width, MLP and vocab with 128-wide heads; 22 layers make it ~1.17B (16 layers would be 0.89B).
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16, num_kv_heads=8)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TRAIN = {"warmup_steps": 2, "lr_scheduler": "cosine", "min_lr_ratio": 0.0, "seed": 0, "save_every": 0}


# ------------------------------------------------------------------------------------ model and data


def build_model(work: Path, seed: int = 0) -> Path:
    """The ~1.1B Llama: tokenizer trained on examples/data, config from MODEL_1B, random init on the GPU,
    saved in bf16. Built once per work dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.data.formats import ALPACA_PROMPT_WITH_INPUT
    from training.tiny import build_tokenizer, corpus_from_jsonl

    out = work / "model-1b"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    files = sorted((REPO / "examples" / "data").glob("*.jsonl"))
    corpus = [ALPACA_PROMPT_WITH_INPUT] * 50 + [text for f in files for text in corpus_from_jsonl(f)]
    tokenizer = build_tokenizer(out, corpus, vocab_size=4096)  # the corpus gives fewer; the model has 32000 rows
    m = MODEL_1B
    config = LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def write_text_data(work: Path, model: Path, docs: int, lo: int, hi: int, seed: int = 0) -> Path:
    """`docs` JSONL documents of lo..hi random (non-special) tokens of the model's tokenizer, as text."""
    from transformers import AutoTokenizer

    out = work / f"synthetic-{docs}x{lo}-{hi}.jsonl"
    if out.exists():
        return out
    tok = AutoTokenizer.from_pretrained(model)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(docs):
            ids = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    tmp.rename(out)
    return out


def job(name: str, model: Path, data: Path, cache: Path, *, full: bool, batch: int, steps: int, attention: str,
        compile: bool = False, checkpointing: str = "none") -> dict:
    return {
        "name": name,
        "model": {"path": str(model), "dtype": "bf16", "attention": attention,
                  "gradient_checkpointing": checkpointing, "compile": compile},
        "finetune": {"type": "full"} if full else {"type": "lora", **LORA},
        "method": {"kind": "pretrain"},
        "data": {
            "train": [{"path": str(data), "format": "text"}], "max_length": SEQ, "packing": True,
            "padding_free": False, "cache_dir": str(cache),
        },
        "train": {
            "micro_batch_size": batch, "global_batch_size": batch, "max_steps": steps,
            "lr": 1e-5 if full else 1e-4, **TRAIN,
        },
        "strategy": {"name": "fsdp" if full else "single"},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": "cuda",
    }


class Prepared:
    """A job file and its tokenized data (so `sharpen run` hits the cache), and the rows sharpen trains on."""

    def __init__(self, work: Path, spec_dict: dict):
        import yaml

        from launcher.jobfile import load_job
        from training.data.cache import load_prepared
        from training.data.prepare import prepare_dataset

        self.path = work / f"{spec_dict['name']}.yaml"
        self.path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        spec = self.spec = load_job(self.path)
        cache = prepare_dataset(  # the same call as launcher/prepare.py's, so `sharpen run` finds this cache
            spec.data, spec.method.kind, spec.model.tokenizer or spec.model.path,
            trust_remote_code=spec.model.trust_remote_code, train_on=getattr(spec.method, "train_on", "all"),
        )
        self.dataset = load_prepared(cache)
        lengths = arms.row_lengths(self.dataset)
        self.order = arms.sharpen_order(
            self.dataset, batch=spec.train.global_batch_size, steps=spec.train.max_steps, seed=spec.train.seed,
            shuffle=spec.data.shuffle,
        )
        self.tokens = [int(sum(lengths[i] for i in rows)) for rows in self.order]
        segments = [s for rows in self.order for i in rows for s in self.dataset[i]["segment_lengths"]]
        # 6 L d (s + 1) per token of a causal segment of s tokens, averaged over the trained tokens
        self.mean_s_plus_1 = sum(s * (s + 1) for s in segments) / sum(segments)
        self.rows_full = all(int(lengths[i]) == SEQ for rows in self.order for i in rows)
        self.one_segment = all(len(self.dataset[i]["segment_lengths"]) == 1 for rows in self.order for i in rows)


# ------------------------------------------------------------------------------------------- FLOPs


def measure_bf16_matmul(n: int = 8192, seconds: float = 1.0, trials: int = 5) -> float:
    """Dense bf16 matmul FLOP/s of this GPU: the best of `trials` loops of ~`seconds`, CUDA-event timed."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.matmul(a, b, out=c)
    end.record()
    torch.cuda.synchronize()
    per = start.elapsed_time(end) / 1000 / 10
    iters = max(10, int(seconds / per))
    best = 0.0
    for _ in range(trials):
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1000))
    del a, b, c
    torch.cuda.empty_cache()
    return best


def matmul_weights(model_dir: Path) -> dict[str, int]:
    """Weights in matmuls, from the config: per layer q, k, v, o and the MLP; the output layer once."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    lora_per_layer = 0
    r = LORA["r"]
    for fan_in, fan_out in ((h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)):
        lora_per_layer += r * (fan_in + fan_out)
    return {
        "base": layers * per_layer + h * c.vocab_size, "lora": layers * lora_per_layer, "layers": layers,
        "attn_width": q, "total_params": layers * per_layer + 2 * h * c.vocab_size + (2 * layers + 1) * h,
    }


def flops_per_token(w: dict[str, int], mean_s_plus_1: float, full: bool) -> float:
    """Full: 6 N. LoRA: the frozen base 4 N (forward, input gradient; no weight gradient), adapters 6 N.
    Both plus causal attention 6 L d (s + 1). (LoRA on the output layer: peft's all-linear skips it.)"""
    attention = 6 * w["layers"] * w["attn_width"] * mean_s_plus_1
    if full:
        return 6 * w["base"] + attention
    return 4 * w["base"] + 6 * w["lora"] + attention
