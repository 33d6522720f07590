"""The machine a benchmark ran on, for the header of a report."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def machine_description() -> dict[str, str]:
    """CPU model, cores, threads, GPU, Python/torch/transformers/rope_patch
    versions, load average and the date."""
    import transformers

    import rope_patch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads (default)": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rope_patch": rope_patch.__version__,
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load average (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info
