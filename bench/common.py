"""What every benchmark shares: the machine it ran on, and how it prints its table."""

import platform
from pathlib import Path
from typing import Sequence


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo: platform.processor() is empty on most Linux machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> None:
    """Columns aligned: the first ``text_columns`` left, the (numeric) rest right; a rule under the
    header."""
    cells = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
