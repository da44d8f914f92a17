"""Process settings the ``hat`` command applies at startup, before torch is imported.

How torch's GNU OpenMP threads wait at the end of each parallel region depends on the machine:

* **free machine** (fewer other runnable threads than half the cores at startup): a short,
  bounded spin (``GOMP_SPINCOUNT=10000``, then sleep). Sleeping at once (``PASSIVE``) makes every
  one of the thousands of small parallel regions per iteration wake the other thread through the
  kernel: the demo's float stage ran at 12.4 img/s with ``PASSIVE`` against 19.3 with the short
  spin on the free 2-core machine (sys/user 0.17 → 0.06);
* **busy machine** (a shared host, other jobs running): ``OMP_WAIT_POLICY=PASSIVE``. A spinning
  thread burns the time slice of the thread it waits for: 0.21 img/s against 1.46 with PASSIVE
  at load ~8; with three busy neighbours, PASSIVE 6.3 img/s, short spin 4.9, libgomp's default
  spin 3.3 (bench/RESULTS.md, "System time and thread settings" and "OpenMP wait policy").

glibc's malloc gives freed activation buffers back to the kernel (heap trim, mmap threshold) and
takes page faults to get them back on the next iteration; raising its trim and mmap thresholds
keeps them (half the minor faults).

Every setting yields to the user's: an ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``MALLOC_*``
variable already in the environment is kept, and ``HAT_PROCESS_SETTINGS=0`` turns all of them off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30    # keep up to 1 GiB of free heap top instead of returning it
TOP_PAD = 64 << 20          # grow the heap 64 MiB at a time
SPINCOUNT = "10000"         # libgomp's default is 300000: ~100x longer, far worse when shared
BUSY_FRACTION = 0.5         # other runnable threads >= this x cores: the machine is busy

_applied: dict[str, str] = {}


def applied() -> dict[str, str]:
    """What :func:`apply_process_settings` set in this process (name -> value)."""
    return dict(_applied)


def apply_process_settings() -> dict[str, str]:
    """Apply the settings above once; returns what was set. Safe to call twice."""
    if _applied or os.environ.get("HAT_PROCESS_SETTINGS", "1") == "0":
        return dict(_applied)
    if ("OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
            and "torch" not in sys.modules):  # both are read when libgomp loads (with torch)
        name, value = wait_policy(other_runnable(), os.cpu_count() or 1)
        os.environ[name] = value
        _applied[name] = value
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            mallopt = None
        if mallopt is not None:
            for setting, param, size in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                         ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                         ("M_TOP_PAD", _M_TOP_PAD, TOP_PAD)):
                if mallopt(ctypes.c_int(param), ctypes.c_int(size)) == 1:
                    _applied[setting] = str(size)
    return dict(_applied)


def wait_policy(others: float, cpus: int) -> tuple[str, str]:
    """The OpenMP wait setting for a machine with ``others`` runnable threads besides this
    process on ``cpus`` cores: a short spin when it is free, PASSIVE when it is busy."""
    if others < BUSY_FRACTION * cpus:
        return "GOMP_SPINCOUNT", SPINCOUNT
    return "OMP_WAIT_POLICY", "PASSIVE"


def other_runnable(samples: int = 5, interval: float = 0.01) -> float:
    """Runnable threads on the machine besides the caller, now: the median of a few readings
    of /proc/loadavg's running count (minus this one), or the 1-minute load average where there
    is no /proc (then recent runs of our own count as busy, which only costs speed)."""
    readings = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        readings.append(max(running - 1, 0))
        if i + 1 < samples:
            time.sleep(interval)
    return float(sorted(readings)[len(readings) // 2])
