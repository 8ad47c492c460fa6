"""Screenshots of MLflow 3.17's UI as a new user sees it: a fresh headless Chromium profile opening the runs-table
address ``lm-lightning sweep`` prints, then the chart view.

    python docs/screenshots.py http://127.0.0.1:5000 <experiment id> docs [run name prefixes to expand, bottom row first]

Writes ``first-load.png`` (as it opens), ``runs-table.png`` (assistant closed, rows expanded), ``chart-view.png``
and ``samples-view.png``.
Needs Playwright (``pip install -e '.[docs]'``) and Chromium at ``/usr/bin/chromium``; it downloads no browser.
"""

import re
import sys
import tempfile

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
base, experiment, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
expand = sys.argv[4:]
table = f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey=scores"
with sync_playwright() as p:
    ctx = p.chromium.launch_persistent_context(
        tempfile.mkdtemp(), executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
        viewport={"width": 2300, "height": 760})
    page = ctx.new_page()
    page.set_default_timeout(90000)
    page.goto(table)
    page.get_by_text("best/val_bpb").first.wait_for()
    page.wait_for_timeout(4000)
    page.screenshot(path=f"{outdir}/first-load.png")
    # The assistant panel opens by itself on a first load: close it with its x (the last button of its header).
    header = page.get_by_text("MLflow Assistant").first.bounding_box()
    closes = [b for b in page.get_by_role("button").all()
              if (bb := b.bounding_box()) and abs(bb["y"] - header["y"]) < 20 and bb["x"] > header["x"] + 200]
    closes[-1].click()
    page.wait_for_timeout(1500)
    for prefix in expand:  # the + left of a run's name
        name = page.get_by_text(re.compile("^" + re.escape(prefix))).first.bounding_box()
        page.mouse.click(name["x"] - 33, name["y"] + name["height"] / 2)
        page.wait_for_timeout(1500)
    page.wait_for_timeout(2000)
    page.screenshot(path=f"{outdir}/runs-table.png")
    # The chart view and the artifact view: the second and third of the view icons left of the search box.
    search = page.get_by_placeholder(re.compile("metrics")).first.bounding_box()
    for name, left in (("chart-view", 132), ("samples-view", 84)):
        page.mouse.click(search["x"] - left, search["y"] + search["height"] / 2)
        page.wait_for_timeout(8000)
        page.screenshot(path=f"{outdir}/{name}.png")
    ctx.close()
