"""Build the step-through notebooks: run every code cell here, in order, and save each .ipynb with its outputs.

    python notebooks/build.py            # all four, from the repository root (a few minutes on a CPU)

A notebook is a list of ("md", text) and ("code", source) cells in notebooks/cells.py. Outputs kept: printed
text and matplotlib figures (PNG). No Jupyter kernel is needed; tests/test_notebooks.py runs the same cells.
"""
import base64
import contextlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # import swd_mini and toy_teacher from the repository root


def run_cells(cells, capture=True):
    """Execute the code cells in one namespace; returns one list of nbformat outputs per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns, outputs = {"__name__": "__notebook__"}, []
    for kind, src in cells:
        if kind != "code":
            outputs.append(None)
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
            exec(compile(src, "<cell>", "exec"), ns)
        out = []
        if buf.getvalue():
            out.append({"output_type": "stream", "name": "stdout", "text": buf.getvalue().splitlines(True)})
        for num in plt.get_fignums():
            png = io.BytesIO()
            plt.figure(num).savefig(png, format="png", dpi=80, bbox_inches="tight")
            out.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(png.getvalue()).decode(), "text/plain": ["<Figure>"]}})
        plt.close("all")
        outputs.append(out)
    return outputs


def to_ipynb(cells, outputs):
    nb_cells = []
    for n, ((kind, src), out) in enumerate(zip(cells, outputs)):
        lines = src.strip("\n").splitlines(True)
        if kind == "md":
            nb_cells.append({"cell_type": "markdown", "metadata": {}, "source": lines})
        else:
            nb_cells.append({"cell_type": "code", "metadata": {}, "execution_count": n + 1, "outputs": out, "source": lines})
    return {"cells": nb_cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def code_cells(path):
    """The (kind, source) cells of a saved notebook, for tests."""
    nb = json.load(open(path))
    return [("code" if c["cell_type"] == "code" else "md", "".join(c["source"])) for c in nb["cells"]]


if __name__ == "__main__":
    from cells import NOTEBOOKS
    os.chdir(os.path.dirname(HERE))
    for name in sys.argv[1:] or NOTEBOOKS:
        cells = NOTEBOOKS[name]
        outputs = run_cells(cells)
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(to_ipynb(cells, outputs), f, indent=1)
        print(f"wrote notebooks/{name}")
