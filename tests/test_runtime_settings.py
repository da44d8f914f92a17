"""The process settings `hat` applies before torch loads (hatcore/runtime.py, docs/trainer.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import json, os, hatcore.cli, hatcore.runtime as r, torch; "
         "print(json.dumps({'env': os.environ.get('OMP_WAIT_POLICY'), 'applied': r.applied()}))")


def _probe(**env: str) -> dict:  # type: ignore[type-arg]
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "HAT_PROCESS_SETTINGS") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_defaults_applied_before_torch() -> None:
    got = _probe()
    assert got["env"] == "PASSIVE"
    assert got["applied"]["OMP_WAIT_POLICY"] == "PASSIVE"
    if sys.platform.startswith("linux"):
        assert got["applied"]["M_TRIM_THRESHOLD"] == str(1 << 30)


def test_user_environment_wins() -> None:
    got = _probe(OMP_WAIT_POLICY="ACTIVE", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["env"] == "ACTIVE"
    assert got["applied"] == {}


def test_switched_off() -> None:
    got = _probe(HAT_PROCESS_SETTINGS="0")
    assert got["env"] is None and got["applied"] == {}
