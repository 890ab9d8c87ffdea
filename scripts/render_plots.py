"""Render `dvc plots show` (or `dvc plots diff`) offline and take a screenshot of the page.

DVC's page loads Vega from a CDN; this inlines local copies instead, then lets headless
Chromium draw the page into a PNG. Needs `npm install vega@5 vega-lite@5 vega-embed@6` in some
folder (``--node-modules``) and a Chromium (Debian: `apt-get install chromium`). Not used by
the pipeline or the tests.

    python scripts/render_plots.py --node-modules /tmp/vega/node_modules --png plots.png
    python scripts/render_plots.py --node-modules ... --png diff.png --diff HEAD~1
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("render_plots")

LIBRARIES = ["vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js",
             "vega-embed/build/vega-embed.min.js"]


def html_template(node_modules: Path) -> str:
    """A page for `dvc plots --html-template` with the three Vega libraries inlined."""
    scripts = []
    for library in LIBRARIES:
        path = node_modules / library
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing; run `npm install vega@5 vega-lite@5 "
                             f"vega-embed@6` in {node_modules.parent}")
        scripts.append(f"<script>{path.read_text(encoding='utf-8')}</script>")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>DVC plots</title>\n"
            + "\n".join(scripts)
            + "\n<style>body { font-family: sans-serif; }</style></head>\n"
              "<body>\n{plot_divs}\n</body></html>\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-modules", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True, help="screenshot to write")
    parser.add_argument("--diff", nargs="*", metavar="REV",
                        help="draw `dvc plots diff REV...` instead of `dvc plots show`")
    parser.add_argument("--window", default="1400,5000", help="width,height in pixels")
    parser.add_argument("targets", nargs="*", help="plot files (default: all)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("error: no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as scratch:
        template = Path(scratch) / "template.html"
        template.write_text(html_template(args.node_modules.resolve()), encoding="utf-8")
        out = Path(scratch) / "page"
        if args.diff is not None:  # revisions are positional there, plots go after --targets
            command = ["dvc", "plots", "diff", *args.diff,
                       *(["--targets", *args.targets] if args.targets else [])]
        else:
            command = ["dvc", "plots", "show", *args.targets]
        subprocess.run([*command, "--html-template", str(template),
                        "-o", str(out)], check=True)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", "--virtual-time-budget=20000",
                        f"--window-size={args.window}", f"--screenshot={args.png.resolve()}",
                        (out / "index.html").resolve().as_uri()],
                       check=True, capture_output=True)
    log.info("wrote %s", args.png)


if __name__ == "__main__":
    sys.exit(main())
