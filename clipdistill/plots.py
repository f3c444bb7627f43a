"""`dvc plots show` for a machine without internet: the same page, with vega loaded from local files.

DVC's page loads vega, vega-lite and vega-embed from a CDN, so offline every chart stays blank.
This writes the page with a template that loads local copies instead (fetch them once with npm):

    npm install --prefix .plots vega@5 vega-lite@5 vega-embed@6
    python -m clipdistill.plots --vendor .plots/node_modules      # -> dvc_plots/index.html

The major versions are the ones DVC's own page asks the CDN for.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARIES = ("vega", "vega-lite", "vega-embed")  # load order: vega-lite and vega-embed need vega
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>clipdistill plots</title>
    %s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def find_library(vendor: Path, name: str) -> Path:
    """<name>.min.js in `vendor` itself or in an npm tree under it (<vendor>/<name>/build/)."""
    for path in (vendor / f"{name}.min.js", vendor / name / "build" / f"{name}.min.js"):
        if path.is_file():
            return path
    raise SystemExit(f"error: {name}.min.js not found in {vendor} (npm install vega@5 vega-lite@5 "
                     "vega-embed@6, then pass its node_modules folder)")


def show(vendor: Path, out: Path) -> Path:
    """Run `dvc plots show` into `out` with the local-vega template; returns the page's path."""
    libraries = [find_library(vendor, name) for name in LIBRARIES]
    scripts = "\n    ".join(f'<script src="vendor/{lib.name}"></script>' for lib in libraries)
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.html"
        template.write_text(TEMPLATE % scripts)
        subprocess.run(["dvc", "plots", "show", "--html-template", str(template), "-o", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    (out / "vendor").mkdir(parents=True, exist_ok=True)
    for lib in libraries:
        shutil.copy(lib, out / "vendor" / lib.name)
    return out / "index.html"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", type=Path, required=True,
                        help="folder with vega.min.js, vega-lite.min.js, vega-embed.min.js (or npm's node_modules)")
    parser.add_argument("--out", type=Path, default=Path("dvc_plots"))
    args = parser.parse_args(argv)
    print(show(args.vendor, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
