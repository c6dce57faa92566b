"""The course site: each executed notebook becomes a page with its figures, readable offline, rendered in Chromium."""

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from vgstudy.__main__ import main
from vgstudy.errors import DataError
from vgstudy.site import build_site, site_notebooks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a closed network needs: no background connections, no sandbox as root, no GPU.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    return out, build_site(NOTEBOOKS, out)


def test_every_committed_notebook_has_a_page_with_its_figures(site):
    out, pages = site
    assert [p.source.name for p in pages] == [p.name for p in site_notebooks(NOTEBOOKS)]
    index = (out / "index.html").read_text()
    for page in pages:
        assert f'href="{page.file}"' in index, f"index.html does not link {page.file}"
        body = (out / page.file).read_text()
        images = re.findall(r'<img[^>]+src="data:image/png;base64,', body)
        assert len(images) == page.figures, f"{page.file}: {len(images)} images, the notebook has {page.figures}"
        assert page.title in body
        # Offline: no script or stylesheet is fetched from elsewhere.
        assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', body), f"{page.file} loads from the network"
    assert any(page.figures for page in pages), "no notebook has a figure: the site test would check nothing"


def test_a_notebook_that_was_not_executed_is_refused_before_anything_is_written(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 00 · t"), nbformat.v4.new_code_cell("1")])
    nbformat.write(nb, notebooks / "00_t.ipynb")
    with pytest.raises(DataError, match=r"00_t\.ipynb.*not executed"):
        build_site(notebooks, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_notebooks_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no executed notebooks"):
        build_site(tmp_path, tmp_path / "out")
    (tmp_path / "broken.ipynb").write_text("{}")  # not named NN_name: ignored
    (tmp_path / "00_bad.ipynb").write_text("not json")
    with pytest.raises(DataError, match=r"00_bad\.ipynb: not a readable notebook"):
        build_site(tmp_path, tmp_path / "out")


def test_site_command(tmp_path, capsys):
    assert main(["site", "--notebooks", str(NOTEBOOKS), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").exists()
    assert "figures" in capsys.readouterr().out
    assert main(["site", "--notebooks", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's package)")
def test_pages_render_in_headless_chromium_with_their_figures(site):
    from playwright.sync_api import sync_playwright

    out, pages = site
    # Screenshots go to VGSTUDY_SCREENSHOTS when set (to look at them), else next to the site.
    shots = Path(os.environ.get("VGSTUDY_SCREENSHOTS", out / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            view = browser.new_page(viewport={"width": 1200, "height": 900})
            remote = []
            view.on("request", lambda r: remote.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            for name, figures in [("index.html", 0)] + [(p.file, p.figures) for p in pages]:
                view.goto((out / name).as_uri(), wait_until="load")
                rendered = view.evaluate("() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
                assert len(rendered) == figures, f"{name}: {len(rendered)} images in the page, expected {figures}"
                assert all(rendered), f"{name}: images {[i for i, ok in enumerate(rendered) if not ok]} did not render"
                headings = view.locator("h1").count()
                assert headings >= 1, f"{name}: no heading rendered"
                view.screenshot(path=str(shots / (Path(name).stem + ".png")), full_page=False)
            assert remote == [], f"pages asked the network for {remote}"
        finally:
            browser.close()
    for name in ["index.html"] + [p.file for p in pages]:
        shot = shots / (Path(name).stem + ".png")
        assert shot.stat().st_size > 10_000, f"{shot}: screenshot looks empty"
