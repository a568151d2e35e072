"""After training: `sharpen generate` and `sharpen eval` on a real LoRA run dir (trained_lora_run, in
conftest.py): its final/, a checkpoint read as export reads it, and a merged export say the same thing;
prompts are formatted with the run's chat template (chatml, not the base model's); lm-eval scores it."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import main

TASK_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "eval_task"
PROMPTS = [{"prompt": "Sort the numbers.\n13 77 70 79"},
           {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Add the two numbers.\n11 and 4"}]}]


def generate(capsys, source, prompts: Path, *extra) -> tuple[list[dict], str]:
    assert main(["generate", str(source), "--prompts", str(prompts), "--max-new-tokens", "12", "--device", "cpu",
                 *map(str, extra)]) == 0
    out, err = capsys.readouterr()
    return sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["index"]), err


def test_generate_from_final_a_checkpoint_and_an_export_of_the_run(trained_lora_run, tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    run = trained_lora_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))

    final, err = generate(capsys, run, prompts)
    assert f"generating with {run} final/ (lora adapter on {tiny_model}) on cpu, fp32" in err
    assert "2 completions of 2 prompts" in err and "Traceback" not in err
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chatml = "<|im_start|>user\nSort the numbers.\n13 77 70 79<|im_end|>\n<|im_start|>assistant\n"
    assert final[0]["prompt_tokens"] == 1 + len(tokenizer(chatml, add_special_tokens=False)["input_ids"])
    assert [r["finish_reason"] for r in final] == ["stop" if r["completion_tokens"] < 12 else "length" for r in final]

    # The last checkpoint holds final/'s weights: the same greedy completions, read by export's reader.
    step4, err = generate(capsys, run, prompts, "--checkpoint", "step-4")
    assert f"{run} checkpoint step-4 (lora on {tiny_model})" in err
    assert [r["completion"] for r in step4] == [r["completion"] for r in final]
    assert [r["prompt_tokens"] for r in step4] == [r["prompt_tokens"] for r in final]  # the plan's chatml

    assert main(["export", str(run), "--to", str(tmp_path / "merged"), "--merge-lora"]) == 0
    capsys.readouterr()
    merged, err = generate(capsys, tmp_path / "merged", prompts)
    assert f"(merged export of {run.resolve()} step-4)" in err
    assert [r["completion"] for r in merged] == [r["completion"] for r in final]

    sampled, _ = generate(capsys, run, prompts, "--checkpoint", "2", "--n", "3", "--temperature", "0.9", "--seed", "7")
    assert [(r["index"], r["sample"]) for r in sampled] == [(i, k) for i in range(2) for k in range(3)]
    assert main(["generate", str(run), "--prompts", str(prompts), "--checkpoint", "step-3"]) == 2
    assert "checkpoints: step-2, step-4" in capsys.readouterr().err


def test_eval_of_the_run_writes_its_results_in_the_run_dir(trained_lora_run, capsys):
    code = main(["eval", str(trained_lora_run), "--tasks", "tiny_opposites", "--include-path", str(TASK_DIR),
                 "--limit", "6", "--device", "cpu"])
    assert code == 0
    out, err = capsys.readouterr()
    results = json.loads((trained_lora_run / "eval" / "results.json").read_text())
    acc = results["results"]["tiny_opposites"]["acc,none"]
    assert results["n-samples"]["tiny_opposites"]["effective"] == 6
    assert ["tiny_opposites", "acc", f"{acc:.4f}"] == out.splitlines()[1].split()[:3]
    assert results["sharpen"]["source"].startswith(f"{trained_lora_run} final/ (lora adapter")
