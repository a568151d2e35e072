"""The job file loader: every mistake in a file is reported at once, by field path, with no traceback."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pydantic
import pytest
import yaml

from launcher.errors import UserError
from launcher.jobfile import apply_overrides, check_inputs, format_errors, load_job, validate
from launcher.spec import JobSpec

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
BAD_JOBS = sorted((TESTS / "fixtures" / "bad_jobs").glob("*.yaml"))
GOOD = TESTS / "fixtures" / "good_jobs"
PROBLEM_LINE = re.compile(r"^  (--set \S+|[A-Za-z_]\w*(\.\w+)*): \S")
MINIMAL = {"model": {"path": "example-org/tiny-llama"}, "data": {"train": [{"path": "train.jsonl"}]}}


def _comments(path: Path, tag: str) -> list[str]:
    prefix = f"# {tag}: "
    return [line[len(prefix) :] for line in path.read_text().splitlines() if line.startswith(prefix)]


def _error(path: Path, overrides: list[str] | tuple[str, ...] = (), **kwargs) -> str:
    """What the user sees: the CLI prints a UserError as `error: {exc}` and exits 2."""
    with pytest.raises(UserError) as info:
        load_job(path, overrides, **kwargs)
    return f"error: {info.value}"


def _write(directory: Path, job: dict, name: str = "job.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _assert_readable(message: str) -> None:
    assert message.startswith("error: ")
    assert "Traceback" not in message
    assert "pydantic" not in message and "https://" not in message and "[type=" not in message
    assert not re.search(r"\b\w+Spec\b|literal\[|function-after|method\.(sft|dpo|pretrain|reward|grpo)\.", message)


def test_the_corpus_covers_many_mistakes():
    assert len(BAD_JOBS) >= 15


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_bad_job_message(path: Path):
    expected = _comments(path, "expect")
    assert expected, f"{path.name} says nothing about what to expect"
    message = _error(path, _comments(path, "set"))
    for text in expected:
        assert text in message, f"{text!r} is not in:\n{message}"
    _assert_readable(message)
    for count in _comments(path, "problems"):
        header, *rest = message.splitlines()
        problems = [line for line in rest if not line.startswith("  hint:")]
        assert re.search(rf": {count} problems? in the job file", header), message
        assert len(problems) == int(count), message
        assert all(PROBLEM_LINE.match(line) for line in problems), message
        lines = [int(n) for n in re.findall(r"\(line (\d+)\)$", "\n".join(problems), re.M)]
        assert lines == sorted(lines), "problems are listed in file order"
        assert rest[-1].startswith("  hint: `sharpen schema`")


def test_all_problems_of_a_file_come_at_once(tmp_path: Path):
    job = {
        "model": {"path": "example-org/m", "dtype": "half"},
        "finetune": {"type": "lora", "lora_alpha": 16},
        "data": {"train": [{"path": "a.jsonl", "format": "messages"}]},
        "train": {"learning_rate": 1e-4, "max_steps": 0},
        "strategy": {"name": "deepspeed"},
    }
    message = _error(_write(tmp_path, job), check_inputs=False)
    assert message.splitlines() == [
        f"error: {tmp_path / 'job.yaml'}: 6 problems in the job file",
        "  model.dtype: 'half' is not one of: auto, bf16, fp16, fp32; did you mean 'fp16'? (line 3)",
        "  finetune.lora_alpha: unknown key; did you mean 'alpha'? (line 6)",
        "  data.train.0.format: 'messages' is not one of: alpaca, chat, sharegpt, text, preference, prompt, feedback; did you mean 'chat'? (line 10)",
        "  train.learning_rate: unknown key; did you mean 'lr'? (line 12)",
        "  train.max_steps: 0 is out of range; must be >= 1 (line 13)",
        "  strategy.name: 'deepspeed' is not one of: auto, single, ddp, fsdp, zero1, zero2, zero3 (line 15)",
        "  hint: `sharpen schema` lists every key with its type, default and meaning (also docs/job-reference.md)",
    ]


# ---- good files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in GOOD.glob("*.yaml")))
def test_good_jobs_load_from_any_directory(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # relative data paths are relative to the job file, not to where sharpen runs
    spec = load_job(GOOD / name)
    for f in [*spec.data.train, *spec.data.eval]:
        assert Path(f.path).is_absolute() and Path(f.path).is_file()
    assert spec.model.path.startswith("example-org/")  # hub ids are left alone


def test_good_jobs_mean_what_they_say():
    minimal = load_job(GOOD / "minimal.yaml")
    assert (minimal.name, minimal.method.kind, minimal.finetune.type) == ("sharpen-job", "sft", "full")
    assert minimal.world_size == 1 and minimal.train.global_batch_size == 8
    assert minimal.data.train[0].path == str(GOOD / "data" / "alpaca.jsonl")
    sft = load_job(GOOD / "sft_lora_chat.yaml")
    assert (sft.world_size, sft.train.lr, sft.data.eval[0].path) == (16, 2e-4, sft.data.train[0].path)
    dpo = load_job(GOOD / "dpo_fsdp_slurm.yaml")
    assert (dpo.method.kind, dpo.method.beta, dpo.train.micro_batch_size) == ("dpo", 0.05, "auto")
    assert (dpo.train.betas, dpo.cluster.slurm.time) == ((0.9, 0.95), "2-00:00:00")
    assert dpo.output_dir == "runs/dpo"  # not there yet: left relative, to the current directory
    pretrain = load_job(GOOD / "pretrain_zero3_cpu.yaml")
    assert (pretrain.strategy.name, pretrain.train.max_grad_norm, pretrain.device) == ("zero3", None, "cpu")


def test_local_inputs_resolve_next_to_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "cache").mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    job = {**MINIMAL, "model": {"path": "./tiny", "tokenizer": "tok"}}
    job["data"] = {"train": [{"path": "train.jsonl"}, {"path": "tatsu-lab/alpaca"}], "cache_dir": "cache"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_job(_write(tmp_path, job))
    assert (spec.model.path, spec.model.tokenizer) == (str(tmp_path / "tiny"), str(tmp_path / "tok"))
    assert (spec.data.train[1].path, spec.data.cache_dir) == ("tatsu-lab/alpaca", str(tmp_path / "cache"))
    assert check_inputs(spec) == []
    (tmp_path / "tiny" / "config.json").unlink()
    assert check_inputs(spec) == [
        f"model.path: {str(tmp_path / 'tiny')!r} has no config.json; give the directory save_pretrained wrote"
    ]


def test_hub_ids_are_not_checked_and_checks_can_be_skipped(tmp_path: Path):
    job = {"model": {"path": "meta-llama/Meta-Llama-3-8B"}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]}}
    assert load_job(_write(tmp_path, job)).data.train[0].path == "tatsu-lab/alpaca"
    missing = _write(tmp_path, {**MINIMAL, "data": {"train": [{"path": "gone.jsonl"}]}}, "missing.yaml")
    assert "data.train.0.path: 'gone.jsonl' does not exist" in _error(missing)
    assert load_job(missing, check_inputs=False).data.train[0].path == "gone.jsonl"


# ---- overrides -------------------------------------------------------------------------------------------------


def test_overrides_are_yaml_values_at_key_paths():
    spec = load_job(
        GOOD / "minimal.yaml",
        [
            "train.lr=1e-4",
            "model.gradient_checkpointing=true",
            "finetune.target_modules=[q_proj, v_proj]",
            "model.tokenizer=null",
            "data.train.0.format=alpaca",
            "data.eval.0.path=data/chat.jsonl",  # creates data.eval and its item 0
            "data.eval.0.format=chat",
            "logging.wandb.project=tuning",  # creates logging.wandb
            "train.betas=[0.8, 0.9]",
            "name=run-2",
            "name=run-3",  # the last one wins
        ],
    )
    assert (spec.train.lr, spec.model.gradient_checkpointing, spec.model.tokenizer) == (1e-4, "full", None)
    assert (spec.finetune.target_modules, spec.train.betas) == (["q_proj", "v_proj"], (0.8, 0.9))
    assert (spec.logging.wandb.project, spec.name) == ("tuning", "run-3")
    assert spec.data.eval[0].path == str(GOOD / "data" / "chat.jsonl") and spec.data.eval[0].format == "chat"


def test_override_problems_read_like_file_problems(tmp_path: Path):
    in_file = _error(_write(tmp_path, {**MINIMAL, "train": {"learning_rate": 1e-4}}), check_inputs=False)
    on_command_line = _error(GOOD / "minimal.yaml", ["train.learning_rate=1e-4"])
    assert "\n  train.learning_rate: unknown key; did you mean 'lr'? (line 7)" in in_file
    assert "\n  --set train.learning_rate=1e-4: unknown key; did you mean 'lr'?\n" in on_command_line


def test_an_override_that_breaks_a_rule_is_named():
    message = _error(GOOD / "minimal.yaml", ["train.micro_batch_size=4", "train.global_batch_size=10"])
    assert message.splitlines()[1] == (
        "  --set train.global_batch_size=10: 10 is not divisible by train.micro_batch_size x ranks (4 x 1 = 4); "
        "try 8 or 12"
    )
    message = _error(GOOD / "minimal.yaml", ["model={path: 7}"])
    assert "--set model={path: 7}: model.path: expected a string, got the number 7" in message


def test_apply_overrides_returns_a_copy_and_rejects_bad_keys():
    raw = {"model": {"path": "m"}, "data": {"train": [{"path": "a.jsonl"}]}}
    out = apply_overrides(
        raw, ["train.lr=3.0e-4", "data.train.1.path=b.jsonl", "method={kind: dpo}", "method.beta=0.2"]
    )
    assert raw == {"model": {"path": "m"}, "data": {"train": [{"path": "a.jsonl"}]}}
    assert out["train"] == {"lr": 3e-4} and out["data"]["train"][1] == {"path": "b.jsonl"}
    assert out["method"] == {"kind": "dpo", "beta": 0.2}
    assert apply_overrides({}, ["train.seed=3"]) == {
        "train": {"seed": 3}
    }  # a file's own problems are not its business
    bad = ["train.learnin_rate=1", "model.path.x=1", "oops", "data.train.x=1", "data.train.0.fomat=chat"]
    with pytest.raises(UserError) as info:
        apply_overrides(raw, bad)
    assert str(info.value).splitlines()[:6] == [
        "5 problems in --set overrides",
        "  --set model.path.x=1: model.path is 'm', a value, not a section with keys",
        "  --set oops: not key.path=value (e.g. --set train.lr=1e-4)",
        "  --set data.train.x=1: data.train is a list of 1 item(s); index it with 0..0 (or 1 to add one)",
        "  --set data.train.0.fomat=chat: unknown key; did you mean 'format'?",
        "  --set train.learnin_rate=1: unknown key; did you mean 'lr'?",
    ]


def test_the_cli_prints_one_message_and_exits_2(capsys: pytest.CaptureFixture[str]):
    from launcher.cli import main

    assert main(["plan", str(TESTS / "fixtures" / "bad_jobs" / "typo_train_keys.yaml"), "--set", "train.seed=x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    header, *problems, hint = err.splitlines()
    assert (
        header
        == f"error: {TESTS / 'fixtures' / 'bad_jobs' / 'typo_train_keys.yaml'}: 4 problems in the job file and its --set overrides"
    )
    assert "  train.learning_rate: unknown key; did you mean 'lr'? (line 9)" in problems
    assert "  --set train.seed=x: expected a whole number, got the string 'x'" in problems
    assert hint.startswith("  hint: `sharpen schema` lists every key")


def test_gradient_checkpointing_takes_a_mode_or_the_old_booleans(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from launcher.cli import main

    modes = {True: "full", False: "none", "selective": "selective", "none": "none", "full": "full", "offload": "offload"}
    for given, mode in modes.items():
        spec = load_job(GOOD / "minimal.yaml", [f"model.gradient_checkpointing={str(given).lower()}"])
        assert spec.model.gradient_checkpointing == mode
    job = _write(tmp_path, {**MINIMAL, "model": {"path": "example-org/m", "gradient_checkpointing": "partial"}})
    assert main(["plan", str(job)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[1] == (
        "  model.gradient_checkpointing: 'partial' is not one of: none, selective, full, offload (line 3)"
    )
    assert "'sellective' is not one of: none, selective, full, offload; did you mean 'selective'?" in _error(
        GOOD / "minimal.yaml", ["model.gradient_checkpointing=sellective"]
    )


# ---- errors outside the schema -----------------------------------------------------------------------------


def test_files_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert _error(Path("nope.yaml")) == f"error: nope.yaml: no such job file (in {tmp_path})"
    assert _error(tmp_path) == f"error: {tmp_path}: is a directory, not a job file"
    (tmp_path / "tabs.yaml").write_text("model:\n\tpath: x\n")
    assert _error(tmp_path / "tabs.yaml").splitlines() == [
        f"error: {tmp_path / 'tabs.yaml'}:2:1: invalid YAML: found character '\\t' that cannot start any token",
        "  2 | \tpath: x   <- indent with spaces, not tabs",
    ]


def test_format_errors_drops_pydantic_noise():
    with pytest.raises(pydantic.ValidationError) as info:
        JobSpec.model_validate({**MINIMAL, "model": {"path": "m", "dtype": "bfloat16"}, "train": {"lr": 0}})
    assert "https://errors.pydantic.dev" in str(info.value)
    assert format_errors(info.value, "job.yaml").splitlines() == [
        "job.yaml: 2 problems in the job file",
        "  model.dtype: 'bfloat16' is not one of: auto, bf16, fp16, fp32; did you mean 'bf16'?",
        "  train.lr: 0 is out of range; must be > 0",
    ]


def test_rules_across_sections_all_come_at_once():
    """The schema's rules and the strategies' capability rules (handed to JobSpec by validate) in one list."""
    with pytest.raises(pydantic.ValidationError) as info:
        validate({**MINIMAL, "method": {"kind": "pretrain"}, "strategy": {"name": "ddp", "offload": "optimizer"}})
    assert format_errors(info.value, "job.yaml").splitlines()[1:] == [
        "  data.train.0.format: 'alpaca' does not fit method.kind 'pretrain', which reads format text",
        "  strategy.offload: 'optimizer' needs a sharded strategy, not 'ddp': use zero2 (one GPU works too), "
        "zero1, zero3, fsdp or auto",
    ]


# ---- the reference -----------------------------------------------------------------------------------------


def _fields(model: type[pydantic.BaseModel]) -> list[tuple[str, str, pydantic.fields.FieldInfo]]:
    found = []
    for name, field in model.model_fields.items():
        found.append((model.__name__, name, field))
        for sub in re.findall(r"\b(\w+(?:Spec|Method|File))\b", str(field.annotation)):
            found += _fields(getattr(importlib.import_module("launcher.spec"), sub))
    return found


def test_every_key_has_a_description():
    undocumented = {f"{model}.{name}" for model, name, field in _fields(JobSpec) if not field.description}
    assert undocumented == set()


def test_job_reference_is_up_to_date():
    script = importlib.util.spec_from_file_location(
        "gen_job_reference", ROOT / "scripts" / "gen_job_reference.py"
    )
    generator = importlib.util.module_from_spec(script)
    script.loader.exec_module(generator)
    committed = (ROOT / "docs" / "job-reference.md").read_text(encoding="utf-8")
    assert committed == generator.render(), "stale: run python scripts/gen_job_reference.py"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == generator.readme_with(committed, readme), "README's key reference is stale: same script"
    for key in (
        "train.lr",
        "data.train.N.format",
        "method.beta",
        "cluster.slurm.partition",
        "logging.wandb.mode",
    ):
        assert f"| `{key}` |" in committed
