"""System metrics of a stage run (rank 0): MLflow's own collectors, delivered through the tracker's queue.

MLflow's switch (`mlflow.enable_system_metrics_logging`) starts its `SystemMetricsMonitor` for runs created by the
fluent `mlflow.start_run`; this project creates runs with an `MlflowClient` on its sender thread, and that monitor
logs through a client of its own that stops for good at the first failed request. So the collectors MLflow's monitor
uses (CPU and memory, disk, network with psutil; NVIDIA GPUs with pynvml, AMD GPUs with pyrsmi) sample here, and the
samples go through the tracker's queue like every other metric: the same ``system/...`` keys the MLflow UI shows in
its System Metrics tab, delivered in order after an outage, spooled at close. Missing psutil or GPU libraries cost
those metrics (one log line), never the run.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("vaebm.tracking")

PREFIX = "system/"


def collectors() -> list:
    """MLflow's metric collectors available here: CPU/memory, disk, network (psutil), plus one GPU collector."""
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    except ImportError as err:  # psutil (or this MLflow module) missing
        log.warning("no system metrics: %s", err)
        return []
    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for path, cls in (("mlflow.system_metrics.metrics.gpu_monitor", "GPUMonitor"),
                      ("mlflow.system_metrics.metrics.rocm_monitor", "ROCMMonitor")):
        try:
            monitors.append(getattr(importlib.import_module(path), cls)())
            break
        except Exception:  # noqa: BLE001 -- no pynvml / no GPU / no driver: CPU metrics only
            continue
    return monitors


class SystemMetricsSampler:
    """A daemon thread that samples every `interval_s` and hands ``{"system/<name>": value}`` with a running step
    (0, 1, 2, ... per stage, like MLflow's monitor) to `emit(metrics, step, timestamp_ms)`."""

    def __init__(self, emit: Callable[[dict[str, float], int, int], None], interval_s: float):
        self._emit = emit
        self._interval_s = interval_s
        self._monitors = collectors()
        self._stop = threading.Event()
        self._step = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="vaebm-system-metrics", daemon=True)

    @property
    def enabled(self) -> bool:
        return bool(self._monitors)

    def start(self) -> None:
        if not self.enabled:
            return
        self._collect()  # primes the counters (psutil's first cpu_percent has no interval to measure)
        self._clear()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and publish a last sample (so even a short stage has one)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            try:
                self._collect()
                metrics: dict[str, float] = {}
                for m in self._monitors:
                    metrics.update(m.aggregate_metrics())
                self._clear()
            except Exception as err:  # noqa: BLE001 -- a failing sensor costs this sample, never the run
                log.warning("system metrics sample failed: %s", err)
                return
            values = {PREFIX + k: float(v) for k, v in metrics.items()}
            if values:
                self._emit(values, self._step, int(time.time() * 1000))
                self._step += 1

    def _collect(self) -> None:
        for m in self._monitors:
            m.collect_metrics()

    def _clear(self) -> None:
        for m in self._monitors:
            m.clear_metrics()
