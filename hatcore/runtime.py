"""Process settings the ``hat`` command applies at startup, before torch is imported.

On a CPU shared by more runnable threads than cores (2 OpenMP threads plus a loader worker on
2 cores, or several users), GNU OpenMP's default of spinning at each parallel region's barrier
burns the time slice of the thread it waits for: the demo's float stage went at 0.21 img/s
against 1.46 img/s with ``OMP_WAIT_POLICY=PASSIVE`` on the shared 2-core machine
(bench/RESULTS.md, "System time and thread settings"). glibc's malloc gives freed activation
buffers back to the kernel (heap trim, mmap threshold) and takes page faults to get them back on
the next iteration; raising its trim and mmap thresholds keeps them (half the minor faults).

Every setting yields to the user's: an ``OMP_WAIT_POLICY`` or ``MALLOC_*`` variable already in
the environment is kept, and ``HAT_PROCESS_SETTINGS=0`` turns all of them off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30    # keep up to 1 GiB of free heap top instead of returning it
TOP_PAD = 64 << 20          # grow the heap 64 MiB at a time

_applied: dict[str, str] = {}


def applied() -> dict[str, str]:
    """What :func:`apply_process_settings` set in this process (name -> value)."""
    return dict(_applied)


def apply_process_settings() -> dict[str, str]:
    """Apply the settings above once; returns what was set. Safe to call twice."""
    if _applied or os.environ.get("HAT_PROCESS_SETTINGS", "1") == "0":
        return dict(_applied)
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when libgomp loads (with torch)
        _applied["OMP_WAIT_POLICY"] = "PASSIVE"
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            mallopt = None
        if mallopt is not None:
            for name, param, value in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                       ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                       ("M_TOP_PAD", _M_TOP_PAD, TOP_PAD)):
                if mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
                    _applied[name] = str(value)
    return dict(_applied)
