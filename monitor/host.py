"""This host's hardware as Prometheus series: every visible GPU through NVML, and this process's CPU share.

GPU series (one per GPU, labelled with NVML's ``gpu`` index, as nvidia-smi numbers them, and its ``uuid``)::

    vitpeer_gpus                                   GPUs reported (0 on a CPU host)
    vitpeer_gpu_info{gpu,uuid,name,driver} 1
    vitpeer_gpu_utilization_ratio{gpu,uuid}        busy share of the last sample period (NVML's %, as 0-1)
    vitpeer_gpu_memory_used_bytes / _total_bytes
    vitpeer_gpu_power_watts                        NVML's milliwatts, in watts
    vitpeer_gpu_temperature_celsius
    vitpeer_nvml_errors_total                      NVML calls that failed (a series is left out, never the peer)

and, on every host, ``vitpeer_process_cpu_utilization_ratio``: CPU seconds this process used per wall second since
the previous scrape, as a share of the cores it may run on. Resident memory is prometheus_client's standard
``process_resident_memory_bytes`` (``ProcessCollector``).

NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``). Without a driver (a CPU peer) ``nvmlInit`` fails
once, the GPU series are absent and ``vitpeer_gpus`` is 0. A GPU that stops answering (or a reading it does not
support, e.g. power on some boards) costs only its series: NVML trouble never reaches the training loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass
class GpuReading:
    index: int
    uuid: str
    name: str
    values: dict[str, float] = field(default_factory=dict)  # metric name -> value, only what NVML answered


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older NVML bindings return bytes


class Nvml:
    """The GPUs NVML sees that this process may use (``CUDA_VISIBLE_DEVICES``), read on demand."""

    def __init__(self, pynvml, visible: str | None):
        self.nvml, self.errors, self.warned = pynvml, 0, set()
        self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        self.handles = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            if _is_visible(index, uuid, visible):
                self.handles.append((index, uuid, _text(pynvml.nvmlDeviceGetName(handle)), handle))

    @classmethod
    def start(cls) -> Nvml | None:
        """NVML for this host's GPUs, or None (logged once) when there is no NVML: no driver, no GPU, no package."""
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception as err:  # NVMLError_LibraryNotFound on CPU hosts, ImportError without the package
            log.debug("no GPU metrics: NVML is not available (%s)", err)
            return None

    def read(self) -> list[GpuReading]:
        nvml, readings = self.nvml, []
        for index, uuid, name, handle in self.handles:
            reading = GpuReading(index, uuid, name)
            probes = {
                "utilization_ratio": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                "memory_used_bytes": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used,
                "memory_total_bytes": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total,
                "power_watts": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_celsius": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            }
            for metric, probe in probes.items():
                try:
                    reading.values[metric] = float(probe(handle))
                except Exception as err:  # NVMLError_NotSupported, GpuIsLost, ...: leave this series out
                    self.errors += 1
                    if (index, metric) not in self.warned:
                        self.warned.add((index, metric))
                        log.warning("GPU %d: NVML cannot read %s (%s); that series is left out", index, metric, err)
            readings.append(reading)
        return readings


def _is_visible(index: int, uuid: str, visible: str | None) -> bool:
    """CUDA_VISIBLE_DEVICES lists indices or (prefixes of) UUIDs; unset means every GPU.

    Indices are taken as NVML's (PCI bus order), which is CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    if visible is None:
        return True
    for entry in (part.strip() for part in visible.split(",") if part.strip()):
        if entry.isdigit() and int(entry) == index:
            return True
        if not entry.isdigit() and uuid.startswith(entry):
            return True
    return False


class HostCollector(Collector):
    """GPU series from NVML and this process's CPU utilization, read at scrape time."""

    def __init__(self, nvml: Nvml | None = None):
        self.nvml = nvml
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.last_cpu, self.last_wall, self.cpu_ratio = time.process_time(), time.monotonic(), 0.0

    def collect(self) -> Iterator[Metric]:
        readings = self.nvml.read() if self.nvml is not None else []
        yield GaugeMetricFamily("vitpeer_gpus", "GPUs this process reports (0: a CPU host)", value=len(readings))
        if self.nvml is not None:
            yield CounterMetricFamily("vitpeer_nvml_errors", "NVML readings that failed", value=self.nvml.errors)
            yield from self._gpu_families(readings, self.nvml.driver)
        yield GaugeMetricFamily(
            "vitpeer_process_cpu_utilization_ratio",
            "CPU time this process used per wall second since the previous scrape, as a share of its usable cores",
            value=self._cpu_ratio(),
        )

    def _gpu_families(self, readings: list[GpuReading], driver: str) -> Iterator[Metric]:
        info = GaugeMetricFamily("vitpeer_gpu_info", "A GPU of this host", labels=["gpu", "uuid", "name", "driver"])
        for reading in readings:
            info.add_metric([str(reading.index), reading.uuid, reading.name, driver], 1)
        yield info
        helps = {
            "utilization_ratio": "Share of the last sample period a kernel ran on the GPU",
            "memory_used_bytes": "GPU memory in use",
            "memory_total_bytes": "GPU memory in total",
            "power_watts": "GPU power draw",
            "temperature_celsius": "GPU core temperature",
        }
        for metric, help_text in helps.items():
            family = GaugeMetricFamily(f"vitpeer_gpu_{metric}", help_text, labels=["gpu", "uuid"])
            for reading in readings:
                if metric in reading.values:
                    family.add_metric([str(reading.index), reading.uuid], reading.values[metric])
            yield family

    def _cpu_ratio(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        if wall - self.last_wall >= 1.0:  # a shorter window (two scrapers at once) keeps the previous value
            self.cpu_ratio = min(1.0, max(0.0, (cpu - self.last_cpu) / (wall - self.last_wall) / self.cores))
            self.last_cpu, self.last_wall = cpu, wall
        return self.cpu_ratio
