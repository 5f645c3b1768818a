"""The host collector: NVML readings become Prometheus series in base units, NVML trouble costs only its series,
and a CPU host reports no GPU series but its process's CPU share.

NVML itself needs an NVIDIA driver: here a stand-in module answers the same calls (``tests/monitor/test_gpu.py``
reads a real GPU where one exists); the CPU path is real.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vitpeer.monitor.host import HostCollector, Nvml


class NVMLError(Exception):
    pass


def fake_nvml(gpus: list[dict], broken: set[tuple[int, str]] = frozenset()) -> SimpleNamespace:
    """The pynvml calls vitpeer.monitor.host makes, answering from ``gpus``; ``broken`` (index, call) pairs raise."""

    def call(name, answer):
        def run(handle, *args):
            if (handle, name) in broken:
                raise NVMLError(f"{name} not supported")
            return answer(gpus[handle])

        return run

    return SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUUID=lambda handle: gpus[handle]["uuid"].encode(),  # older bindings return bytes
        nvmlDeviceGetName=lambda handle: gpus[handle]["name"],
        nvmlDeviceGetUtilizationRates=call("utilization", lambda gpu: SimpleNamespace(gpu=gpu["util_percent"])),
        nvmlDeviceGetMemoryInfo=call("memory", lambda gpu: SimpleNamespace(used=gpu["used"], total=gpu["total"])),
        nvmlDeviceGetPowerUsage=call("power", lambda gpu: gpu["milliwatts"]),
        nvmlDeviceGetTemperature=call("temperature", lambda gpu: gpu["celsius"]),
    )


GPUS = [
    {"uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "util_percent": 87, "used": 2**34, "total": 80 * 2**30}
    | {"milliwatts": 412_500, "celsius": 61},
    {"uuid": "GPU-bbbb", "name": "NVIDIA H100 80GB HBM3", "util_percent": 0, "used": 0, "total": 80 * 2**30}
    | {"milliwatts": 70_000, "celsius": 33},
]


def samples(collector: HostCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def gpu(index: int, uuid: str) -> tuple:
    return (("gpu", str(index)), ("uuid", uuid))


def test_gpu_readings_in_base_units_with_index_and_uuid():
    got = samples(HostCollector(Nvml(fake_nvml(GPUS), visible=None)))
    assert got[("vitpeer_gpus", ())] == 2
    assert got[("vitpeer_gpu_utilization_ratio", gpu(0, "GPU-aaaa"))] == pytest.approx(0.87)
    assert got[("vitpeer_gpu_utilization_ratio", gpu(1, "GPU-bbbb"))] == 0
    assert got[("vitpeer_gpu_memory_used_bytes", gpu(0, "GPU-aaaa"))] == 2**34
    assert got[("vitpeer_gpu_memory_total_bytes", gpu(1, "GPU-bbbb"))] == 80 * 2**30
    assert got[("vitpeer_gpu_power_watts", gpu(0, "GPU-aaaa"))] == pytest.approx(412.5)
    assert got[("vitpeer_gpu_temperature_celsius", gpu(1, "GPU-bbbb"))] == 33
    info = (("driver", "550.54.15"), ("gpu", "0"), ("name", "NVIDIA H100 80GB HBM3"), ("uuid", "GPU-aaaa"))
    assert got[("vitpeer_gpu_info", info)] == 1
    assert got[("vitpeer_nvml_errors_total", ())] == 0


@pytest.mark.parametrize(
    "visible, expected", [("1", ["GPU-bbbb"]), ("GPU-aa", ["GPU-aaaa"]), ("", []), ("0,1", ["GPU-aaaa", "GPU-bbbb"])]
)
def test_only_the_gpus_cuda_visible_devices_allows(visible: str, expected: list[str]):
    got = samples(HostCollector(Nvml(fake_nvml(GPUS), visible=visible)))
    uuids = sorted(dict(labels)["uuid"] for name, labels in got if name == "vitpeer_gpu_utilization_ratio")
    assert uuids == expected and got[("vitpeer_gpus", ())] == len(expected)


def test_a_failing_reading_drops_only_its_series_and_is_counted():
    collector = HostCollector(Nvml(fake_nvml(GPUS, broken={(0, "power"), (1, "utilization")}), visible=None))
    for scrape in (1, 2):
        got = samples(collector)
        assert ("vitpeer_gpu_power_watts", gpu(0, "GPU-aaaa")) not in got
        assert ("vitpeer_gpu_utilization_ratio", gpu(1, "GPU-bbbb")) not in got
        assert got[("vitpeer_gpu_power_watts", gpu(1, "GPU-bbbb"))] == 70
        assert got[("vitpeer_gpu_utilization_ratio", gpu(0, "GPU-aaaa"))] == pytest.approx(0.87)
        assert got[("vitpeer_nvml_errors_total", ())] == 2 * scrape


def test_this_cpu_host_has_no_gpu_series_and_reports_its_cpu_share():
    collector = HostCollector(Nvml.start())  # the real NVML lookup: no driver on CI machines
    if collector.nvml is not None:
        pytest.skip("this host has NVML; tests/monitor/test_gpu.py covers it")
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry)
    assert b"vitpeer_gpus 0.0" in text and b"vitpeer_gpu_utilization_ratio" not in text
    started = time.process_time()
    while time.process_time() - started < 1.2:  # one busy core for a while
        pass
    busy = samples(collector)[("vitpeer_process_cpu_utilization_ratio", ())]
    assert 0.5 / collector.cores < busy <= 1.0, busy
    time.sleep(1.2)
    idle = samples(collector)[("vitpeer_process_cpu_utilization_ratio", ())]
    assert idle < busy / 2, (idle, busy)
