"""CPU, memory, disk, network and GPU utilisation as curves of the MLflow run, during fit.

The numbers are MLflow's system metrics (its collectors, its names: ``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``, ... the GPU ones
through nvidia-ml-py when there is an NVIDIA GPU), logged with the step that MLflow's UI plots
them against. MLflow's own monitor sends them with blocking calls of its own and stops for good at
the first failed one; here they go through the run's client like every other point of the fit, so
with the CLI's logger they are kept in the tracking spool while the server is away
(:mod:`callbacks.tracking.spool`) instead of being lost, and nothing waits for the server.
"""

from __future__ import annotations

import logging
import threading
import time

import lightning as L

from callbacks.tracking.mlflow_run import mlflow_logger

log = logging.getLogger(__name__)

PREFIX = "system/"


class SystemMetrics(L.Callback):
    """Log the machine's utilisation to the fit's MLflow run, from global rank 0 (whose node it is).

    Args:
        enabled: log system metrics (``--system_metrics.enabled false`` turns them off).
        sampling_interval: seconds between two samples.
        samples_before_logging: samples averaged into one logged point.
    """

    def __init__(self, enabled: bool = True, sampling_interval: float = 10.0, samples_before_logging: int = 1):
        if sampling_interval <= 0 or samples_before_logging < 1:
            raise ValueError("system_metrics: sampling_interval must be > 0 and samples_before_logging >= 1, "
                             f"not {sampling_interval} and {samples_before_logging}")
        self.enabled = enabled
        self.sampling_interval = sampling_interval
        self.samples_before_logging = samples_before_logging
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = mlflow_logger(trainer)
        if not self.enabled or logger is None or not trainer.is_global_zero:
            return
        client, run_id = logger.experiment, logger.run_id
        monitors = collectors()
        step = next_step(client, run_id)  # a resumed run's curves go on, not back to 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(client, run_id, monitors, step, self._stop),
                                        name="system-metrics", daemon=True)
        self._thread.start()

    def _loop(self, client, run_id: str, monitors: list, step: int, stop: threading.Event) -> None:
        from mlflow.entities import Metric

        while not stop.is_set():
            for _ in range(self.samples_before_logging):
                for monitor in monitors:
                    monitor.collect_metrics()
                if stop.wait(self.sampling_interval):
                    break
            values: dict[str, float] = {}
            for monitor in monitors:
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            if not values:
                continue
            now = int(time.time() * 1000)
            try:
                client.log_batch(run_id, metrics=[Metric(PREFIX + k, float(v), now, step) for k, v in values.items()])
            except Exception as e:  # noqa: BLE001 - a client without a spool: the server went away
                log.warning("system metrics: not logged (%s); stopping them for this fit", e)
                return
            step += 1

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish()  # before the logger's finalize closes the spool: the last point goes with the rest

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            self._thread = self._stop = None


def collectors() -> list:
    """MLflow's system metric collectors for this machine, as its own monitor picks them: CPU and
    memory, disk, network, and the GPUs when nvidia-ml-py (or ROCm's library) finds any. Only the
    collectors are used: the monitor's thread and its logging are replaced here."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id="").monitors


def next_step(client, run_id: str) -> int:
    """One past the largest step of the run's system metrics (0 for a new run)."""
    try:
        run = client.get_run(run_id)
        keys = [k for k in run.data.metrics if k.startswith(PREFIX)]
        # every collector logs at each step: one curve says where they all are
        return max((m.step for m in client.get_metric_history(run_id, keys[0])), default=-1) + 1 if keys else 0
    except Exception:  # noqa: BLE001 - the run cannot be read now: start again at 0
        return 0
