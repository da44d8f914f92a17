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

glibc's malloc gives freed activation buffers back to the kernel and takes page faults (the
kernel zeroing every new page) to get them back on the next iteration: a block over 32 MiB
(glibc's largest mmap threshold; a 512² batch's activations are 64-256 MiB each) is its own
``mmap`` and goes back with ``munmap`` when freed, and a heap top over the trim threshold is
trimmed. So the process takes every block from its heap (``M_MMAP_MAX`` 0: no mmap'd blocks) and
keeps what it frees (``M_TRIM_THRESHOLD`` -1: no trimming): an FCOS-B0 512² float stage ran
2.14 → 3.08 img/s, 7.3 → 1.6 M minor faults per 12 steps (bench/RESULTS.md, "System time at
512²"). The memory the process peaked at stays with it until :func:`release_memory` (called
after each stage) hands the free part back. And torch's CPU allocator asks for transparent huge
pages for blocks of 2 MiB and more (``THP_MEM_ALLOC_ENABLE=1``, where the kernel offers them):
one fault per 2 MiB instead of per 4 KiB (1.6 → 0.6 M faults, 3.08 → 3.33 img/s, sys/user CPU
0.48-0.63 → 0.28-0.29). The cost of both: a higher peak resident size (3.7 → 5.0-5.5 GiB at
that 512² batch of 8), the heap's free blocks being kept.

Every setting yields to the user's: an ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``,
``THP_MEM_ALLOC_ENABLE`` or ``MALLOC_*`` variable already in the environment is kept, and
``HAT_PROCESS_SETTINGS=0`` turns all of them off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
MMAP_MAX = 0                # no block is its own mmap: every one comes from (and goes back to) the heap
TRIM_THRESHOLD = -1         # mallopt(3): -1 turns trimming off
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
    if ("THP_MEM_ALLOC_ENABLE" not in os.environ and "torch" not in sys.modules
            and huge_pages_available()):  # read by torch's CPU allocator at its first use
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        _applied["THP_MEM_ALLOC_ENABLE"] = "1"
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ):
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            mallopt = None
        if mallopt is not None:
            for setting, param, size in (("M_MMAP_MAX", _M_MMAP_MAX, MMAP_MAX),
                                         ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                         ("M_TOP_PAD", _M_TOP_PAD, TOP_PAD)):
                if mallopt(ctypes.c_int(param), ctypes.c_int(size)) == 1:
                    _applied[setting] = str(size)
    return dict(_applied)


def huge_pages_available() -> bool:
    """Whether the kernel gives transparent huge pages to a region that asks (``madvise`` or
    ``always`` in /sys/kernel/mm/transparent_hugepage/enabled)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def release_memory() -> bool:
    """Hand the heap's free memory back to the kernel (``malloc_trim``), where the settings
    above keep it; the pipeline calls this after each stage, so a stage's peak does not stay
    with the process through the next. Returns whether anything was released."""
    if "M_TRIM_THRESHOLD" not in _applied:
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0)))
    except (OSError, AttributeError):
        return False


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
