"""The process settings `hat` applies before torch loads (hatcore/runtime.py, docs/trainer.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hatcore import runtime

PROBE = ("import json, os, hatcore.cli, hatcore.runtime as r, torch; "
         "print(json.dumps({'env': os.environ.get('OMP_WAIT_POLICY'), "
         "'spin': os.environ.get('GOMP_SPINCOUNT'), 'thp': os.environ.get('THP_MEM_ALLOC_ENABLE'), "
         "'applied': r.applied()}))")


def _probe(script: str = PROBE, **env: str) -> dict:  # type: ignore[type-arg]
    """Run ``script`` in a fresh interpreter without any of the settings' variables but ``env``;
    its last output line, as JSON."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "HAT_PROCESS_SETTINGS",
                         "THP_MEM_ALLOC_ENABLE")
            and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env={**base, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextmanager
def busy_machine() -> Iterator[int]:
    """As many busy-looping processes as the machine has cores, for the duration."""
    n = os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # all running
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_wait_policy_spins_briefly_on_a_free_machine_and_sleeps_on_a_busy_one() -> None:
    assert runtime.wait_policy(0, 2) == ("GOMP_SPINCOUNT", "10000")
    assert runtime.wait_policy(0.9, 2) == ("GOMP_SPINCOUNT", "10000")
    assert runtime.wait_policy(1, 2) == ("OMP_WAIT_POLICY", "PASSIVE")
    assert runtime.wait_policy(1, 4) == ("GOMP_SPINCOUNT", "10000")
    assert runtime.wait_policy(7, 4) == ("OMP_WAIT_POLICY", "PASSIVE")


def test_defaults_applied_before_torch_on_a_busy_machine() -> None:
    with busy_machine() as n:
        assert runtime.other_runnable() >= n - 1  # the busy loops are seen (give one slack)
        got = _probe()
    assert got["env"] == "PASSIVE" and got["spin"] is None
    assert got["applied"]["OMP_WAIT_POLICY"] == "PASSIVE"
    if sys.platform.startswith("linux"):
        assert got["applied"]["M_TRIM_THRESHOLD"] == "-1" and got["applied"]["M_MMAP_MAX"] == "0"
        assert (got["thp"] == "1") == runtime.huge_pages_available()


def test_user_environment_wins() -> None:
    got = _probe(OMP_WAIT_POLICY="ACTIVE", MALLOC_TRIM_THRESHOLD_="131072",
                 THP_MEM_ALLOC_ENABLE="0")
    assert got["env"] == "ACTIVE" and got["thp"] == "0"
    assert got["applied"] == {}


def test_a_users_spin_count_wins() -> None:
    got = _probe(GOMP_SPINCOUNT="0")
    assert got["spin"] == "0" and got["env"] is None
    assert "OMP_WAIT_POLICY" not in got["applied"] and "GOMP_SPINCOUNT" not in got["applied"]


def test_switched_off() -> None:
    got = _probe(HAT_PROCESS_SETTINGS="0")
    assert got["env"] is None and got["thp"] is None and got["applied"] == {}


HEAP_PROBE = """
import ctypes, json, hatcore.cli, hatcore.runtime as r
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
mmapped = libc.mallinfo2().hblkhd
block = libc.malloc(ctypes.c_size_t(96 << 20))   # a 512-px batch's activation is about this
grew = libc.mallinfo2().hblkhd - mmapped
libc.free(ctypes.c_void_p(block))
kept = libc.mallinfo2().fordblks
r.release_memory()
print(json.dumps({"mmapped": grew, "kept": kept, "after_release": libc.mallinfo2().fordblks}))
"""


def test_large_blocks_come_from_the_heap_and_stay_until_released() -> None:
    """The malloc settings' effect, read from glibc's own counters: a 96 MiB block is not
    its own mmap, its memory stays in the heap when freed (no munmap, no trim: the next
    iteration does not fault it back in), and release_memory hands it back."""
    if not sys.platform.startswith("linux"):
        return
    got = _probe(HEAP_PROBE)
    assert got["mmapped"] == 0 and got["kept"] >= 96 << 20 and got["after_release"] < 96 << 20
    off = _probe(HEAP_PROBE, HAT_PROCESS_SETTINGS="0")  # glibc's defaults: an mmap, unmapped
    assert off["mmapped"] >= 96 << 20 and off["kept"] < 96 << 20
