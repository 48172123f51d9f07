"""Optional experiment trackers: metric lines also go to MLflow and/or Weights & Biases when the
user asks for them and has them installed. Never required: without ``trackers`` nothing is imported."""

from __future__ import annotations

import logging
import os

from lexica.config import ConfigError

log = logging.getLogger(__name__)
KNOWN = ("mlflow", "wandb")


def check_trackers(names: list[str]) -> None:
    """In the driver, before training: unknown or uninstalled trackers are named up front."""
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"unknown tracker {name!r}; available: {', '.join(KNOWN)}")
        try:
            __import__(name)
        except ImportError as error:
            raise ConfigError(f"tracker {name!r} is not installed here ({error}); `pip install {name}` "
                              f"or remove it from train.trackers") from error


class MLflowTracker:
    """One MLflow run per dictionary, in experiment ``experiment``. Its id is kept next to the
    metrics, so a resumed job, and the evaluation after training, continue the same MLflow run.
    The tracking URI is resolved in the driver, so remote workers log to the same place."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, params: dict,
                 run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id
        if not run_id:
            mlflow.log_params({key: str(value)[:500] for key, value in params.items()})

    def log(self, metrics: dict) -> None:
        values = {key: float(value) for key, value in metrics.items()
                  if key != "step" and isinstance(value, (int, float))}
        self.mlflow.log_metrics(values, step=int(metrics["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    """One W&B run per dictionary in project ``experiment``; like MLflow, its id is kept next to the
    metrics so a resumed job and the evaluation continue it. Where runs go (cloud, a local server,
    or ``WANDB_MODE=offline`` files) and the API key come from W&B's own environment variables,
    which Lexica never reads or logs."""

    name = "wandb"

    def __init__(self, experiment: str, run_name: str, params: dict, run_id: str | None = None):
        import wandb

        if run_id:
            self.run = wandb.init(project=experiment, id=run_id, resume="allow")
        else:
            self.run = wandb.init(project=experiment, name=run_name, config=params)
        self.run_id = self.run.id

    def log(self, metrics: dict) -> None:
        values = {key: float(value) for key, value in metrics.items()
                  if key != "step" and isinstance(value, (int, float))}
        self.run.log(values, step=int(metrics["step"]))

    def close(self) -> None:
        self.run.finish()


def open_trackers(config, run_name: str, run_ids: dict) -> list:
    """The trackers ``config.trackers`` names; ``run_ids`` (tracker → run id) continues earlier runs."""
    params = {key: value for key, value in vars(config).items() if key != "storage_options"}
    trackers = []
    for name in config.trackers:
        if name == "mlflow":
            trackers.append(MLflowTracker(config.tracking_uri, config.experiment, run_name, params,
                                          run_ids.get("mlflow")))
        elif name == "wandb":
            trackers.append(WandbTracker(config.experiment, run_name, params, run_ids.get("wandb")))
    return trackers


def driver_tracking_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI")
