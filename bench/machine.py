"""What every benchmark records about the machine it ran on."""

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo: platform.processor() is empty on most Linux machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
