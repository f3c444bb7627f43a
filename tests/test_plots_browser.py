"""`dvc plots show` as a person sees it: the page (with vega loaded from local copies, as
`python -m clipdistill.plots` writes it) opened in headless Chromium, every chart drawn, no error
or "Loading" left, and a screenshot that is not blank."""
import re
import shutil
import sys

import pytest
import yaml
from PIL import Image

from project import ROOT, run

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
VEGA = ("vega@5", "vega-lite@5", "vega-embed@6")  # the major versions DVC's own page asks its CDN for
BROWSER = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]


def expected_charts() -> int:
    """The data plots dvc.yaml declares (top-level and per stage); images are not charts."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage_plots = [p for s in dvc["stages"].values() for p in s.get("plots", [])]
    data = [p for p in stage_plots if not str(next(iter(p)) if isinstance(p, dict) else p).endswith(".png")]
    return len(dvc.get("plots", [])) + len(data)


@pytest.fixture(scope="module")
def page(tiny_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(root / "npm"), *VEGA], root)
    project = root / "project"
    shutil.copytree(tiny_project[0], project, symlinks=True)
    # three epochs, so the per-epoch curves are lines rather than single points
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  epochs: 1\n  batch_size: 3", "  epochs: 3\n  batch_size: 3"))
    run(["dvc", "repro"], project)
    out = run([sys.executable, "-m", "clipdistill.plots", "--vendor", str(root / "npm" / "node_modules"), "--out",
               str(project / "dvc_plots")], project).stdout.strip().splitlines()[-1]
    return project / out


def test_every_chart_renders_in_a_real_browser(page):
    dom = run([*BROWSER, "--dump-dom", f"file://{page}"], ROOT).stdout
    embeds = page.read_text().count("vegaEmbed(")  # each call replaces its <script> once it has drawn
    assert embeds == expected_charts() >= 7
    drawn = re.findall(r'class="vega-embed[^"]*"', dom)
    assert len(drawn) == embeds, f"{embeds - len(drawn)} charts not drawn"
    assert len(re.findall(r"<canvas|<svg", dom)) >= embeds
    assert "Loading" not in dom and "Error" not in dom and "error" not in dom.lower().split("<body")[1]
    assert re.search(r'<img[^>]+preview', dom), "the synthesis preview image"


def test_screenshot_shows_the_charts(page, tmp_path):
    shot = tmp_path / "plots.png"
    run([*BROWSER, f"--screenshot={shot}", "--window-size=1280,4800", f"file://{page}"], ROOT)
    image = Image.open(shot).convert("RGB")
    colours = len(image.resize((320, 1200)).getcolors(maxcolors=320 * 1200))
    assert colours > 50, f"a nearly blank page ({colours} colours)"
