"""How long report.html takes and how big it is, on an existing work dir; optionally its screenshot.

    python bench/report_bench.py runs/demo [--recipe recipes/demo.toml --set K=V ...]
                                 [--repeat 3] [--screenshot docs/report.png]

Prints the page's size and the median time of ``hatcore.report.write`` (the page alone, as at
the end of ``hat run``); with ``--recipe``, also the time of the comparison drawings
(``hatcore.summary.draw_comparison``: ground truth, float and deployed model on
``predict.vis_images`` images). The screenshot is the top of the page in headless Chromium
(tests/browser.py), re-encoded smaller with OpenCV.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args()

    from hatcore import report, summary
    from hatcore.pipeline import Pipeline
    from hatcore.plugins import get_plugins

    plugins = get_plugins()
    if args.recipe:
        pipe = Pipeline.load(args.recipe, args.overrides, plugins)
        t0 = time.perf_counter()
        drawn = summary.draw_comparison(pipe)
        print(f"comparison drawings: {len(drawn)} pictures in {time.perf_counter() - t0:.2f} s")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        page = report.write(args.work_dir, plugins.hook)
        times.append(time.perf_counter() - t0)
    text = page.read_text()
    print(f"{page}: {page.stat().st_size / 1024:.0f} KiB, {text.count('<section ')} sections, "
          f"{text.count('<img ')} pictures, {text.count('<svg')} charts; written in "
          f"{statistics.median(times):.2f} s (median of {args.repeat}: "
          f"{', '.join(f'{t:.2f}' for t in times)})")
    if args.screenshot:
        spec = importlib.util.spec_from_file_location("browser", ROOT / "tests" / "browser.py")
        assert spec and spec.loader
        browser = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(browser)
        import cv2

        raw = args.screenshot.with_suffix(".raw.png")
        browser.screenshot(page, raw, width=1200, height=1500)
        img = cv2.imread(str(raw))
        img = cv2.resize(img, (900, round(img.shape[0] * 900 / img.shape[1])),
                         interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(args.screenshot), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        raw.unlink()
        print(f"{args.screenshot}: {args.screenshot.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
