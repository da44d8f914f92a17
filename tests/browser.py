"""Headless Chromium for the report's tests and screenshot (Debian package ``chromium``).

``make setup`` installs it when absent and allowed (root + apt); :func:`chromium` returns None
where it is not installed, so a test can skip and say why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--no-first-run", "--disable-extensions"]


def chromium() -> str | None:
    """The Chromium executable, or None when none is installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state between calls
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, timeout: float = 120) -> str:
    """The DOM of ``page`` after its scripts ran (``load`` fired), as Chromium serialises it."""
    proc = _run(["--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri()], timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium --dump-dom failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def report_check(dom: str) -> dict[str, str]:
    """The ``data-*`` attributes the report's script set on ``#report-check``."""
    tag = re.search(r"<div id=\"report-check\"[^>]*>", dom)
    if tag is None:
        return {}
    return dict(re.findall(r"data-([a-z-]+)=\"([^\"]*)\"", tag.group(0)))


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1600,
               timeout: float = 120) -> Path:
    """A PNG of the top ``width`` × ``height`` pixels of ``page``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(["--virtual-time-budget=15000", f"--window-size={width},{height}",
                 f"--screenshot={out.resolve()}", page.resolve().as_uri()], timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium --screenshot failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out
