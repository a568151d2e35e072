"""Rank 0's experiment trackers: W&B, MLflow and TensorBoard behind one object the loop calls.

`Trackers.start` opens those the job's `logging` section names; `log(row)` sends a metrics.jsonl row to
each, `log_table` a table (W&B's only), `finish(status)` closes them, and `state()` is what a checkpoint
keeps of them (their run ids). A resumed run continues each tracker's own run. Nothing here imports
torch or a tracker's package at import time: the launcher calls `check_extras` before any rank starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from training.metrics import WandbRun

log = logging.getLogger("sharpen")

MLFLOW_RUN_ID_FILE = "mlflow_run_id"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# What each tracker imports, and the extra that installs it. MLflow's SQL stores (sqlite, the default)
# also need SQLAlchemy and alembic, which mlflow-skinny leaves out and the extra adds.
EXTRAS = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard",)}
NAMES = {"mlflow": "MLflow", "tensorboard": "TensorBoard"}
MAX_FAILURES = 3  # logged steps in a row that MLflow refused before rank 0 stops sending it more
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
SQL_STORE_MODULES = ("sqlalchemy", "alembic")
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# A plan value whose key names a credential (hf_token, api_key; not tokenizer) is never sent; nor is a
# URL's user:password part.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def check_extras(logging_section: Any) -> None:
    """UserError when the job names a tracker whose package is not installed (called before any rank)."""
    for name, modules in EXTRAS.items():
        if getattr(logging_section, name, None) is None:
            continue
        if name == "mlflow" and _sql_store(logging_section.mlflow.tracking_uri):
            modules = modules + SQL_STORE_MODULES
        missing = [m for m in modules if _missing(m)]
        if missing:
            raise UserError(
                f"logging.{name}: this job logs to {NAMES[name]}, "
                f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed",
                f"pip install 'sharpen[{name}]', or remove logging.{name} from the job",
            )


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # a module put in sys.modules as None: treated as absent, as `import` does
        return True


def _sql_store(tracking_uri: str | None) -> bool:
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or "sqlite:"
    return uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def flat_params(config: dict[str, Any], max_length: int) -> dict[str, str]:
    """The plan as MLflow parameters: nested keys joined by '.', lists as JSON, each value cut to MLflow's
    limit; credentials left out (a key that names one, a URL's user:password)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        if not prefix or SECRET_KEY.search(prefix):
            return
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = URL_USERINFO.sub(r"\g<scheme>", text)
        if len(text) > max_length:
            text = text[: max_length - 1] + "…"
        out[re.sub(r"[^\w\-. /]", "_", prefix)[:250]] = text

    walk("", config)
    return out


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values, step aside (a tracker's step is its own argument)."""
    return {
        k: float(v) for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }  # fmt: skip


class MlflowRun:
    """An MLflow run, through MlflowClient (no global active run). Its id is kept in RUN/mlflow_run_id, so a
    resumed job continues it. MLflow keeps every value logged at a step (a step logged twice has two points);
    a resumed run redoes the steps after its checkpoint, so each metric is sent only for steps past the last
    one the MLflow run already has: the redone steps reproduce the same values (resume is exact)."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], experiment: str, config: dict[str, Any]):
        # A tracking server that does not answer costs a logged step seconds, not MLflow's minutes of retries
        # (the loop waits on log_batch; past its limit the hang watch would stop the run). Yours win if set.
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) stay out of the rank log
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        uri = settings.get("tracking_uri") or os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.client = MlflowClient(tracking_uri=uri)
        self._last_step: dict[str, int] = {}
        self._failures = 0
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        run = self._resume(id_file.read_text().strip()) if id_file.exists() else None
        if run is None:
            name = settings.get("experiment") or experiment
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else self.client.create_experiment(name)
            run = self.client.create_run(
                experiment_id, run_name=settings.get("run_name") or run_dir.name,
                tags={"sharpen.run_dir": str(run_dir.resolve())},
            )
            id_file.write_text(run.info.run_id + "\n")
        self.id = run.info.run_id
        self._log_params(run, config)
        log.info("MLflow run %s in %s", self.id, _redacted(uri))

    def _resume(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            log.warning("MLflow run %s from %s not found in this store (%s): starting a new run",
                        run_id, MLFLOW_RUN_ID_FILE, exc)
            return None
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            self._last_step[key] = max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
        return run

    def _log_params(self, run, config: dict[str, Any]) -> None:
        from mlflow.utils import validation

        params = flat_params(config, getattr(validation, "MAX_PARAM_VAL_LENGTH", 500))
        kept = run.data.params  # a parameter once logged cannot change: a resume adds only new ones
        changed = sorted(k for k, v in params.items() if k in kept and kept[k] != v)
        if changed:
            log.info("MLflow keeps these parameters as first logged: %s", ", ".join(changed))
        new = [self._param(k, v) for k, v in params.items() if k not in kept]
        for i in range(0, len(new), 100):  # MLflow's most parameters in one batch
            self.client.log_batch(self.id, params=new[i : i + 100])

    def log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        now = int(time.time() * 1000)
        values = {k: v for k, v in numbers(row).items() if step > self._last_step.get(k, -1)}
        if not values or self._failures >= MAX_FAILURES:
            return
        try:
            self.client.log_batch(self.id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])
        except Exception as exc:  # the tracking server's trouble does not stop a training run
            self._failures += 1
            log.warning("MLflow: step %d not logged: %s", step, exc)
            if self._failures == MAX_FAILURES:
                log.warning("MLflow: %d logged steps in a row failed: no more MLflow logging until the run is "
                            "resumed (metrics.jsonl has every step)", MAX_FAILURES)
            return
        self._failures = 0
        self._last_step.update(dict.fromkeys(values, step))

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        pass  # tables (GRPO's completions) go to W&B; MLflow gets their scalar metrics in the row

    def state(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.id}

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


class TensorboardRun:
    """TensorBoard event files, written by torch.utils.tensorboard (which needs the tensorboard package).
    A resumed run appends to the same directory from its checkpoint's step: purge_step makes TensorBoard
    drop the events a stopped attempt wrote past that step, so each step has one value."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], start_step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        directory = run_dir / Path(settings.get("dir") or "tensorboard").expanduser()  # an absolute dir stays so
        self.dir = directory
        self._writer = SummaryWriter(log_dir=str(directory), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self._writer.add_text("plan", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in numbers(row).items():
            self._writer.add_scalar(key, value, row["step"])
        self._writer.flush()

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def finish(self, status: str) -> None:
        self._writer.close()


class Trackers:
    """Every tracker of the run, called once per logged row by the loop (rank 0; other ranks hold none)."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []
        self._finished = False

    @classmethod
    def start(cls, run_dir: Path, plan, start_step: int) -> Trackers:
        """The trackers `plan.spec.logging` names, with the plan as their configuration or parameters."""
        spec = plan.spec
        settings = spec.logging
        config = plan.model_dump()
        trackers: list = []
        if settings.wandb is not None and settings.wandb.mode != "disabled":
            trackers.append(WandbRun(run_dir, settings.wandb.model_dump(), config))
        if settings.mlflow is not None:
            trackers.append(MlflowRun(run_dir, settings.mlflow.model_dump(), spec.name, config))
        if settings.tensorboard is not None:
            trackers.append(TensorboardRun(run_dir, settings.tensorboard.model_dump(), start_step, config))
        return cls(trackers)

    def log(self, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            for tracker in self.trackers:
                tracker.log_table(key, rows, step)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: each tracker's run id (wandb_id, mlflow_run_id)."""
        out: dict[str, Any] = {"wandb_id": None}
        for tracker in self.trackers:
            out.update(tracker.state())
        return out

    def finish(self, status: str = "FINISHED") -> None:
        """End each tracker's run once: FINISHED, FAILED (the rank raised) or KILLED (stopped to requeue)."""
        if self._finished:
            return
        self._finished = True
        for tracker in self.trackers:
            try:
                tracker.finish(status)
            except Exception as exc:  # one tracker's trouble closes the others all the same
                log.warning("%s did not finish cleanly: %s", type(tracker).__name__, exc)


def _redacted(uri: str) -> str:
    return URL_USERINFO.sub(r"\g<scheme>", uri)
