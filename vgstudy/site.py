"""The course site: the committed, executed notebooks as static HTML pages with an index, readable offline.

`build_site(notebooks_dir, out_dir)` converts every `NN_name.ipynb` with nbconvert (JupyterLab's page, figures
embedded as data URIs) through the template in `site_templates/vgstudy`, which leaves out every script a page would
fetch from a CDN and adds a navigation bar. `python -m vgstudy site` and `make site` call it.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from vgstudy.checkpoint import atomic_write_bytes
from vgstudy.errors import DataError

TEMPLATES = Path(__file__).with_name("site_templates")
NOTEBOOK_NAME = re.compile(r"^\d\d_.+\.ipynb$")


@dataclass(frozen=True)
class Page:
    """One notebook's page: where it comes from, its file name in the site, its title and summary, its figures."""

    source: Path
    file: str
    title: str
    summary: str
    figures: int


def site_notebooks(notebooks_dir: str | Path) -> list[Path]:
    """The course's notebooks in order (`NN_name.ipynb`), or a DataError when there are none."""
    folder = Path(notebooks_dir)
    found = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    if not found:
        raise DataError(f"{folder}: no executed notebooks (NN_name.ipynb) to build a site from")
    return found


def _read_executed(path: Path) -> nbformat.NotebookNode:
    """The notebook, checked to have been executed: a page of unexecuted cells would teach nothing."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises several types for a file that is not a notebook
        raise DataError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from e
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    if unexecuted:
        raise DataError(f"{path}: code cells {unexecuted} were not executed (run `make execute` first)")
    return nb


def _title_and_summary(nb: nbformat.NotebookNode, fallback: str) -> tuple[str, str]:
    """The first Markdown heading, and the first paragraph after it (Markdown, on one line)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.strip().splitlines()
        if lines and lines[0].startswith("#"):
            title = lines[0].lstrip("#").strip()
            rest = "\n".join(lines[1:]).strip().split("\n\n")[0]
            return title, re.sub(r"\s+", " ", rest)
    return fallback, ""


def _count_figures(nb: nbformat.NotebookNode) -> int:
    """PNG outputs: each becomes one <img> on the page."""
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


def _navigation(pages: list[Page], current: str | None) -> str:
    links = ['<a href="index.html">Contents</a>' if current is not None else '<span class="current">Contents</span>']
    for page in pages:
        label = html.escape(page.title)
        links.append(
            f'<span class="current">{label}</span>' if page.file == current else f'<a href="{page.file}">{label}</a>'
        )
    return "\n".join(links)


def _index_html(pages: list[Page]) -> str:
    import mistune  # nbconvert's Markdown renderer; the summaries are Markdown

    items = "\n".join(f'<li><a href="{p.file}">{html.escape(p.title)}</a>{mistune.html(p.summary)}</li>' for p in pages)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>vgstudy: the notebooks</title>
<style>
  body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.45; }}
  nav.vgstudy-nav {{ padding: 0.6em 1em; background: #f3f4f6; border-bottom: 1px solid #ddd; }}
  nav.vgstudy-nav a, nav.vgstudy-nav .current {{ margin-right: 1.2em; }}
  li {{ margin-bottom: 1em; }} li p {{ margin: 0.3em 0; color: #333; }}
</style></head>
<body>
<nav class="vgstudy-nav">{_navigation(pages, None)}</nav>
<h1>vgstudy: visual grounding, studied in notebooks</h1>
<p>Each page is a notebook executed with its default parameters (the <code>tiny</code> profile on a CPU).
Rerun any of them with other parameters through <code>python -m vgstudy run</code>.</p>
<ol>
{items}
</ol>
</body>
</html>
"""


def build_site(notebooks_dir: str | Path, out_dir: str | Path) -> list[Page]:
    """Write index.html and one page per executed notebook into `out_dir`; returns the pages in order."""
    from nbconvert import HTMLExporter  # local import: only the site needs nbconvert

    sources = site_notebooks(notebooks_dir)
    notebooks = {path: _read_executed(path) for path in sources}  # every notebook checked before anything is written
    pages = []
    for path, nb in notebooks.items():
        title, summary = _title_and_summary(nb, path.stem)
        pages.append(Page(path, path.stem + ".html", title, summary, _count_figures(nb)))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="vgstudy", extra_template_basedirs=[str(TEMPLATES)])
    for page in pages:
        resources = {"metadata": {"name": page.title}, "site_nav": _navigation(pages, page.file)}
        body, _ = exporter.from_notebook_node(notebooks[page.source], resources=resources)
        atomic_write_bytes(out / page.file, body.encode())
    atomic_write_bytes(out / "index.html", _index_html(pages).encode())
    return pages
