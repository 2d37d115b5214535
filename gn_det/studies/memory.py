"""Process memory as the benchmarks measure it (Linux ``/proc``).

Peak RSS of one step is read from the kernel's high-water mark (VmHWM) after resetting it to
the current RSS, so a peak from before the step (model building, an earlier step) cannot be
reported as the step's. Run the measured process with ``MALLOC_MMAP_THRESHOLD_`` set (see
:data:`MEASURE_ENV`) so that freed tensors go back to the kernel and RSS follows live tensors.
"""

from __future__ import annotations

import resource

__all__ = ["MEASURE_ENV", "peak_rss_mib", "reset_peak_rss", "rss_mib"]

# glibc: allocations from 64 KiB up are separate mmaps, returned to the kernel when freed.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_mib() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
