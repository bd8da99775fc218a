"""What machine this worker runs on, for its adverts: GPUs, CPU model, cores and RAM.

Detected once when the worker starts, after its backend loaded (`detect_hardware`). GPUs come
from torch when the backend already imported it (CUDA devices, or Apple's MPS), else from NVML
(`nvidia-ml-py`, the `[gpu]` extra) when that and NVIDIA's driver are there, else there are
none. Torch is never imported here just to look: a worker fronting an engine or an echo worker
does not load it. Every probe is best effort: what cannot be read stays empty or 0.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import structlog

from schemas.nodes import Gpu, Hardware

log = structlog.get_logger(__name__)

PROBE_TIMEOUT = 5.0  # seconds a helper command (sysctl) may take


def detect_hardware() -> Hardware:
    """This machine, as far as it can be seen. Blocking (reads files, may run sysctl)."""
    return Hardware(
        cpu=cpu_model(),
        cores=os.cpu_count() or 0,
        memory=total_memory(),
        gpus=torch_gpus() if "torch" in sys.modules else nvml_gpus(),
        system=f"{platform.system()} {platform.machine()}".strip(),
    )


def torch_gpus() -> tuple[Gpu, ...]:
    """The GPUs torch sees: every CUDA (or ROCm) device, else Apple's MPS device."""
    import torch

    try:
        if torch.cuda.is_available():
            return tuple(
                Gpu(props.name, int(props.total_memory))
                for props in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
            )
        if torch.backends.mps.is_available():
            return (Gpu(f"{cpu_model() or 'Apple'} (MPS)", _mps_memory(torch)),)
    except (RuntimeError, AssertionError) as e:  # a broken driver: no GPU we can use
        log.warning("hardware.torch_gpus_failed", error=str(e))
    return ()


def _mps_memory(torch: Any) -> int:
    recommended = getattr(torch.mps, "recommended_max_memory", None)  # torch >= 2.5
    try:
        return int(recommended()) if recommended else 0
    except RuntimeError:
        return 0


def nvml_gpus() -> tuple[Gpu, ...]:
    """NVIDIA GPUs through NVML; none when `pynvml` or the driver's library is missing."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver library (NVMLError_LibraryNotFound) or no device
        return ()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Gpu(name.decode() if isinstance(name, bytes) else str(name), int(memory)))
        return tuple(gpus)
    except pynvml.NVMLError as e:
        log.warning("hardware.nvml_failed", error=str(e))
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            log.debug("hardware.nvml_shutdown_failed", error=str(e))


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, sysctl on macOS, else `platform`."""
    if cpuinfo.exists():
        try:
            name = cpu_model_from_cpuinfo(cpuinfo.read_text(errors="replace"))
        except OSError:
            name = ""
        if name:
            return name
    if sys.platform == "darwin":
        try:
            done = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=PROBE_TIMEOUT
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass  # fall through to what platform knows
    return platform.processor() or platform.machine()


def cpu_model_from_cpuinfo(text: str) -> str:
    """The model line of a /proc/cpuinfo text: x86's `model name`, else ARM's `Model` or
    `Hardware` (the board), else the CPU part's `Processor` line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key not in fields:
            fields[key] = value
    for key in ("model name", "model", "hardware", "processor", "cpu model"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # x86's `processor : 0` is an index, not a name
            return " ".join(value.split())
    return ""


def total_memory() -> int:
    """Bytes of RAM: psutil where installed, else the POSIX page counts."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0
