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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_a_lesson(path):
    """At least 300 words of prose, an equation, "what to notice" after every figure, an exercise last."""
    cells = build.code_cells(path)
    prose = [src for kind, src in cells if kind == "md"]
    assert sum(len(src.split()) for src in prose) >= 300
    assert any("$" in src for src in prose)
    assert cells[-1][0] == "md" and "## Exercise" in cells[-1][1]
    saved = build.json.load(open(path))["cells"]
    for k, cell in enumerate(saved[:-1]):  # a cell that draws a figure is followed by what to notice
        if any(o["output_type"] == "display_data" for o in cell.get("outputs", [])):
            assert "What to notice" in "".join(saved[k + 1]["source"]), (path, k)


def test_notebook_03_steps_one_iteration_by_hand():
    code = "\n".join(src for kind, src in build.code_cells(NOTEBOOKS[2]) if kind == "code")
    assert "sm.fake_score_step(" in code and "sm.generator_step(" in code and "sm.Config(" in code
    assert "sm.distill(" not in code  # not the loop as a black box
