"""Run tracking (``paca train --report-to tensorboard,wandb,mlflow``): one small interface, one class per backend.

The training loop calls :meth:`Tracker.log_train` every ``--log-every`` steps and :meth:`Tracker.log_eval` for each
held-out evaluation; it never knows which backend listens. Each backend is its own library, an optional extra
(``paca-hal[tensorboard]``, ``[wandb]``, ``[mlflow]`` or all three as ``[tracking]``) imported only when its tracker
starts; :func:`check_report_to` names a missing one (with its ``pip install``) before any weights load. Nothing needs
the network: TensorBoard writes event files (``<out>/runs`` or ``--logging-dir``), MLflow a local file store
(``<out>/mlruns``) unless ``MLFLOW_TRACKING_URI`` names another, and W&B logs offline under ``WANDB_MODE=offline``
(synced later with ``wandb sync``). Importing this module imports no torch (``paca train --help`` reads its names).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

#: What ``--report-to`` accepts besides the backends: nothing tracked (the default).
NONE = "none"

#: The loop's record keys (``metrics.json``'s history) -> the names every backend logs them under (HF Trainer's).
TRAIN_SCALARS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "peak_memory_mb": "train/peak_memory_mb",
}
EVAL_LOSS = "eval/loss"


class Tracker(ABC):
    """One tracking backend. ``start`` once (rank 0, after the weights loaded), ``log`` as training goes, ``finish``
    once (also after a failure, with ``failed=True``)."""

    #: The ``--report-to`` name, the module to import and the optional extra that installs it.
    name: ClassVar[str]
    module: ClassVar[str]
    extra: ClassVar[str]
    pip_name: ClassVar[str]

    def __init__(self, out_dir: Path, run_name: str, logging_dir: Path | None = None):
        self.out_dir, self.run_name, self.logging_dir = Path(out_dir), run_name, logging_dir

    def local_dir(self) -> Path | None:
        """The folder this backend writes into on this machine (None: it sends its data elsewhere)."""
        return None

    @classmethod
    def environment_folder(cls) -> tuple[str, Path] | None:
        """Where an environment variable tells the backend's library to write on this machine instead of under --out
        (``("$WANDB_DIR", path)``), so ``paca train`` can refuse one inside its inputs before the weights load."""
        return None

    @abstractmethod
    def start(self, config: Mapping[str, Any]) -> None:
        """Open the run and record ``config`` (the run's resolved flags)."""

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at optimizer step ``step``."""

    @abstractmethod
    def finish(self, failed: bool = False) -> None:
        """Flush and close the run."""

    def log_train(self, record: Mapping[str, float], step: int) -> None:
        """One ``--log-every`` window of the loop (its ``metrics.json`` history record)."""
        self.log({TRAIN_SCALARS[key]: float(value) for key, value in record.items() if key in TRAIN_SCALARS and value is not None},
                 step)

    def log_eval(self, loss: float, step: int) -> None:
        """A held-out loss, at the step it was measured."""
        self.log({EVAL_LOSS: float(loss)}, step)


class TensorBoardTracker(Tracker):
    """Event files through torch's ``SummaryWriter`` (needs the ``tensorboard`` package): ``tensorboard --logdir``."""

    name, module, extra, pip_name = "tensorboard", "tensorboard", "tensorboard", "tensorboard"

    def local_dir(self) -> Path:
        return self.logging_dir if self.logging_dir is not None else self.out_dir / "runs"

    def start(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.local_dir()))
        self.writer.add_text("config", "\n".join(f"    {key}: {value!r}" for key, value in config.items()))  # a code block

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, failed: bool = False) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run: project ``$WANDB_PROJECT`` (default paca-hal), files under ``<out>/wandb`` unless
    ``$WANDB_DIR`` says otherwise; ``WANDB_MODE=offline`` logs without network (``wandb sync`` uploads later)."""

    name, module, extra, pip_name = "wandb", "wandb", "wandb", "wandb"

    def local_dir(self) -> Path | None:
        return None if os.environ.get("WANDB_DIR") else self.out_dir / "wandb"

    @classmethod
    def environment_folder(cls) -> tuple[str, Path] | None:
        folder = os.environ.get("WANDB_DIR")
        return ("$WANDB_DIR", Path(folder).expanduser()) if folder else None

    def start(self, config: Mapping[str, Any]) -> None:
        import wandb

        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT", "paca-hal"), "name": self.run_name, "config": dict(config)}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.out_dir)  # wandb makes its own wandb/ folder inside
        self.run = wandb.init(**kwargs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default paca-hal), through ``MlflowClient`` (no global
    state). Tracking URI: ``$MLFLOW_TRACKING_URI``, else a local file store at ``<out>/mlruns`` (MLflow 3 keeps that
    backend in maintenance mode and asks for ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this process when
    unset; view it with ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <out>/mlruns``)."""

    name, module, extra, pip_name = "mlflow", "mlflow", "mlflow", "mlflow"
    #: MLflow's limits per ``log_batch`` call (params; metrics are far below theirs).
    PARAMS_PER_BATCH = 100
    PARAM_CHARS = 500

    def local_dir(self) -> Path | None:
        return None if os.environ.get("MLFLOW_TRACKING_URI") else self.out_dir / "mlruns"

    @classmethod
    def environment_folder(cls) -> tuple[str, Path] | None:
        """A local store ``$MLFLOW_TRACKING_URI`` names: a ``file:`` URI or plain path (a folder), or ``sqlite:///`` (the
        database file); a server's URI is not on this machine."""
        from urllib.parse import unquote, urlparse

        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if not uri or uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for a remote workspace
            return None
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # C:\\... on Windows: a drive, not a scheme
            path = unquote(parsed.path) if parsed.scheme == "file" else uri
        elif parsed.scheme == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
            path = unquote(parsed.path[1:])  # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db
        else:
            return None
        return ("$MLFLOW_TRACKING_URI", Path(path).expanduser())

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.local_dir().resolve().as_uri()

    def start(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri())
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "paca-hal")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(key, str(value)[: self.PARAM_CHARS]) for key, value in config.items()]
        for first in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[first : first + self.PARAMS_PER_BATCH])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


#: ``--report-to`` name -> backend, in the order ``--help`` lists them.
TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoardTracker, WandbTracker, MLflowTracker)}


def parse_report_to(text: str) -> list[str]:
    """``--report-to``'s names: a comma list of backends, or ``none`` (empty list). Raises ValueError naming a bad one."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names or names == [NONE]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or NONE in names:
        bad = ", ".join(unknown) or NONE
        raise ValueError(f"--report-to {text!r}: {bad} is not a tracker; use {', '.join(TRACKERS)} (comma-separated) or {NONE}")
    return list(dict.fromkeys(names))


def report_to_argument(text: str) -> str:
    """argparse type of ``--report-to``: the names, checked and written back as one comma list."""
    try:
        names = parse_report_to(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return ",".join(names) or NONE


def check_report_to(text: str) -> list[str]:
    """The backends ``--report-to`` asks for, each library checked installed (without importing it); a missing one is
    one line naming its ``pip install``, before anything heavy runs."""
    from ..extras import MissingExtraError, installed

    names = parse_report_to(text)
    for name in names:
        cls = TRACKERS[name]
        if not installed(cls.module):
            raise MissingExtraError(f"--report-to {name} needs the '{cls.module}' package, which is not installed: "
                                    f"pip install 'paca-hal[{cls.extra}]' (or: pip install {cls.pip_name})")
    return names


class TrackerGroup(Tracker):
    """Every tracker ``--report-to`` named, as one (the loop holds one object whatever the backends)."""

    name, module, extra, pip_name = "group", "", "", ""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def start(self, config: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.start(config)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish(failed)
            except Exception as error:  # noqa: BLE001 - one backend failing to close must not hide the others' data
                logger.warning("Closing the %s run failed: %s", tracker.name, error)


def start_tracking(report_to: str, out_dir: str | os.PathLike[str], *, run_name: str | None = None,
                   logging_dir: str | os.PathLike[str] | None = None, config: Mapping[str, Any] | None = None,
                   claim: Callable[[Path], None] | None = None) -> TrackerGroup | None:
    """Start every backend ``report_to`` names (None when it names none).

    ``claim(path)`` is called first with each folder a backend will write into, so ``paca train``'s run folder
    lists it (:class:`paca_core.files.outputs.RunFolder`). A backend that cannot start is one line naming it.
    """
    names = check_report_to(report_to)
    if not names:
        return None
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    folder = Path(os.path.abspath(Path(logging_dir).expanduser())) if logging_dir else None
    trackers = [TRACKERS[name](out, run_name or out.name, folder) for name in names]
    started: list[Tracker] = []
    for tracker in trackers:
        where = tracker.local_dir()
        if where is not None and claim is not None:
            claim(where)
        try:
            tracker.start(dict(config or {}))
        except Exception as error:  # a backend's own failure (login, URI): one line, and the others closed
            TrackerGroup(started).finish(failed=True)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PacaConfigError(f"--report-to {tracker.name} could not start its run ({first}); fix it or drop {tracker.name} "
                                  "from --report-to.") from error
        started.append(tracker)
        logger.info("Tracking with %s%s", tracker.name, f" in {where}" if where is not None else "")
    return TrackerGroup(started)


__all__ = ["EVAL_LOSS", "NONE", "TRACKERS", "TRAIN_SCALARS", "MLflowTracker", "TensorBoardTracker", "Tracker", "TrackerGroup",
           "WandbTracker", "check_report_to", "parse_report_to", "report_to_argument", "start_tracking"]
