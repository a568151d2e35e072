"""MLflow and TensorBoard as rank 0 feeds them (training/trackers.py), read back with their own readers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main as sharpen_main
from launcher.errors import UserError
from launcher.spec import LoggingSpec
from training.trackers import MLFLOW_RUN_ID_FILE, MlflowRun, TensorboardRun, Trackers, check_extras

GOOD_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "good_jobs" / "data" / "alpaca.jsonl"
CONFIG = {
    "job": {"name": "t", "train": {"lr": 0.001, "betas": [0.9, 0.95]}, "hub": {"hf_token": "hf_never"},
            "model": {"tokenizer": "tok-dir"}},
    "notes": "x" * 7000,  # past MLflow's parameter length
    "store": "https://alice:pa55word@mlflow.example/",
}


def rows(steps, scale: float = 1.0) -> list[dict]:
    return [{"step": s, "loss": scale / s, "lr": 1e-3, "epoch": 0, "mfu": None, "note": "text"} for s in steps]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file store, which MLflow 3 opens when MLFLOW_ALLOW_FILE_STORE says so: seconds faster than a new
    sqlite store's tables (the default store, sqlite, is the one tests/ranks/test_resume.py's run uses)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield (tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri()


def mlflow_run(run_dir: Path, store: str, config=CONFIG) -> Trackers:
    settings = {"tracking_uri": store, "experiment": None, "run_name": None}
    return Trackers([MlflowRun(run_dir, settings, "tuning", config)])


def test_mlflow_metrics_params_and_a_resumed_run(store, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    trackers = mlflow_run(run_dir, store)
    for row in rows([1, 2, 3]):
        trackers.log(row)
    trackers.log({"step": 3, "eval/loss": 0.5})
    run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    assert trackers.state() == {"wandb_id": None, "mlflow_run_id": run_id}
    trackers.finish("KILLED")  # stopped after step 3 (its checkpoint at step 2)

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert (run.info.status, run.info.run_name) == ("KILLED", "run-1")
    assert client.get_experiment(run.info.experiment_id).name == "tuning"
    assert sorted(run.data.metrics) == ["epoch", "eval/loss", "loss", "lr"]  # None and text are not metrics
    params = run.data.params
    assert params["job.train.lr"] == "0.001" and params["job.train.betas"] == "[0.9, 0.95]"
    assert len(params["notes"]) == 6000 and params["store"] == "https://mlflow.example/"
    assert not any("hf_never" in v or "pa55word" in v for v in params.values())
    assert "job.hub.hf_token" not in params and params["job.model.tokenizer"] == "tok-dir"

    # resumed from step 2: step 3 is redone, then 4; the same MLflow run, each step once
    resumed = mlflow_run(run_dir, store, {**CONFIG, "job": {**CONFIG["job"], "name": "changed"}, "new": 1})
    assert client.get_run(run_id).info.status == "RUNNING"
    for row in rows([3, 4], scale=2.0):
        resumed.log(row)
    resumed.finish("FINISHED")
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(history) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["job.name"] == "t" and run.data.params["new"] == "1"  # a param once logged stays


def test_mlflow_takes_the_experiment_and_run_name_from_the_job(store, tmp_path):
    from mlflow.tracking import MlflowClient

    run = MlflowRun(tmp_path, {"tracking_uri": store, "experiment": "exp-b", "run_name": "first-try"}, "job", {})
    run.log({"step": 1, "loss": 2.0})
    run.finish("FAILED")
    got = MlflowClient(tracking_uri=store).get_run(run.id)
    assert (got.info.status, got.info.run_name, got.data.metrics) == ("FAILED", "first-try", {"loss": 2.0})


def test_tensorboard_scalars_and_a_resume_that_redoes_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = {"dir": None}
    first = TensorboardRun(tmp_path, settings, 0, {"job": {"name": "t"}})
    for row in rows([1, 2, 3]):
        first.log(row)
    first.finish("KILLED")
    resumed = TensorboardRun(tmp_path, settings, 2, {})  # from the checkpoint at step 2
    for row in rows([3, 4], scale=2.0):
        resumed.log(row)
    resumed.finish("FINISHED")

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch", "loss", "lr"]
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 0.5), (3, pytest.approx(2 / 3)), (4, 0.5)]
    assert events.Tags()["tensors"] == ["plan/text_summary"]


def test_a_missing_tracker_package_is_named_with_its_extra(monkeypatch):
    section = LoggingSpec.model_validate({"mlflow": {"tracking_uri": "http://mlflow:5000"}, "tensorboard": {}})
    check_extras(section)  # both installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError) as info:
        check_extras(section)
    assert str(info.value).startswith("logging.tensorboard: this job logs to TensorBoard, but tensorboard is not")
    assert "pip install 'sharpen[tensorboard]'" in str(info.value)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # a sqlite store (the default) needs SQLAlchemy too
    with pytest.raises(UserError, match=r"(?s)sqlalchemy is not installed.*sharpen\[mlflow\]"):
        check_extras(LoggingSpec.model_validate({"mlflow": {}}))


def test_sharpen_run_without_mlflow_exits_2_before_anything_runs(tmp_path, monkeypatch, capsys):
    job = {
        "model": {"path": "example-org/tiny-llama"},
        "data": {"train": [{"path": str(GOOD_DATA), "format": "alpaca"}]},
        "logging": {"mlflow": {"experiment": "tuning"}},
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code = sharpen_main(["run", str(job_file), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [
        "error: logging.mlflow: this job logs to MLflow, but mlflow is not installed",
        "  hint: pip install 'sharpen[mlflow]', or remove logging.mlflow from the job",
    ]
    assert not (tmp_path / "run").exists()


def test_mlflow_refusing_steps_does_not_stop_training_and_is_given_up_after_three(store, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    run = MlflowRun(tmp_path, {"tracking_uri": store}, "gives-up", {})
    run.log({"step": 1, "loss": 2.0})
    MlflowClient(tracking_uri=store).delete_run(run.id)  # from now on the store refuses the run's metrics
    with caplog.at_level("WARNING", logger="sharpen"):
        for step in range(2, 7):
            run.log({"step": step, "loss": 1.0})
    warnings = [r.getMessage() for r in caplog.records]
    assert [w.split(":")[1] for w in warnings[:3]] == [" step 2 not logged", " step 3 not logged", " step 4 not logged"]
    assert warnings[3].startswith("MLflow: 3 logged steps in a row failed: no more MLflow logging") and len(warnings) == 4
