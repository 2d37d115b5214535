"""Memory as the benchmarks measure it: the process's (Linux ``/proc``), and the bytes autograd
keeps for backward (:class:`SavedForBackward`).

Peak RSS of one step is read from the kernel's high-water mark (VmHWM) after resetting it to
the current RSS, so a peak from before the step (model building, an earlier step) cannot be
reported as the step's. Run the measured process with ``MALLOC_MMAP_THRESHOLD_`` set (see
:data:`MEASURE_ENV`) so that freed tensors go back to the kernel and RSS follows live tensors.
"""

from __future__ import annotations

import resource
import weakref
from typing import Iterable

import torch

__all__ = ["MEASURE_ENV", "SavedForBackward", "peak_rss_mib", "reset_peak_rss", "rss_mib"]

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


class SavedForBackward:
    """Measure what autograd keeps for backward from the forward run inside this context.

    ``nbytes`` counts the distinct storages still alive among the tensors saved for backward,
    storages of ``exclude`` (a model's parameters) left out; read it while the forward's
    outputs are alive (a saved tensor nothing keeps is already freed)::

        with SavedForBackward(model.parameters()) as saved:
            out = model(x)
        print(saved.nbytes)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._packed = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        self._packed.append(weakref.ref(tensor))
        return tensor

    def __enter__(self) -> "SavedForBackward":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        storages = {}
        for ref in self._packed:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self._exclude:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())
