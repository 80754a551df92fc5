"""Every notebook runs top to bottom: its saved code cells are executed in order, in one namespace."""
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_four_notebooks_with_outputs():
    assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]
    for path in NOTEBOOKS:
        cells = build.json.load(open(path))["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(c["outputs"] for c in code[1:]), f"{path} was saved without its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cells = build.code_cells(path)
    from cells import NOTEBOOKS as SOURCES
    assert cells == [(k, s.strip("\n")) for k, s in SOURCES[os.path.basename(path)]], "rebuild: python notebooks/build.py"
    outputs = build.run_cells(cells)
    assert any(out for out in outputs if out)
