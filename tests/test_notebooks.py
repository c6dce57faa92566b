"""Notebook hygiene: each committed notebook is executed, in sync with its .py source, and parameterised."""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
EXECUTED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert SOURCES, "no notebooks/NN_name.py found"


@pytest.mark.parametrize("ipynb", EXECUTED, ids=lambda p: p.name)
def test_each_ipynb_has_its_py_source(ipynb):
    assert ipynb.with_suffix(".py").exists(), f"{ipynb.name} has no .py pair"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_pair_in_sync(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{source.name} has no executed .ipynb (run `make execute`)"
    from_py = jupytext.read(source)
    from_ipynb = jupytext.read(ipynb)

    def cells(nb):
        return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]

    assert cells(from_py) == cells(from_ipynb), f"{source.name} and {ipynb.name} differ: run `make execute`"


@pytest.mark.parametrize("ipynb", EXECUTED, ids=lambda p: p.name)
def test_executed_in_order_without_errors(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert None not in counts, f"{ipynb.name}: cells {[i for i, n in enumerate(counts) if n is None]} not executed"
    assert counts == list(range(1, len(code) + 1)), f"{ipynb.name}: not executed top to bottom in one run: {counts}"
    for i, cell in enumerate(code):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{ipynb.name}: code cell {i} has an error output: {errors[0].get('ename')}"
        for o in cell.outputs:
            if o.output_type == "stream" and o.name == "stderr":
                assert "Traceback" not in o.text, f"{ipynb.name}: code cell {i} printed a traceback"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_first_code_cell_is_the_parameters_cell(source):
    nb = jupytext.read(source)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{source.name}: first code cell is not tagged parameters"
    assert "profile" in first.source and "seed" in first.source and "device" in first.source
    assert 'profile = "tiny"' in first.source, f"{source.name}: default profile must be tiny"
    # The cell after it validates the parameters.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "config.load(locals()" in code[1].source, f"{source.name}: second code cell must validate the parameters"


def test_progress_bars_are_off_under_test(capsys):
    import os

    from tqdm import tqdm

    assert os.environ.get("TQDM_DISABLE") == "1"  # set by conftest.py and the Makefile
    for _ in tqdm(range(3)):
        pass
    assert capsys.readouterr().err == ""
