"""notebooks/quickstart.ipynb runs top to bottom, headless, with a 2-step distillation."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("EMD_QUICKSTART_STEPS", "2")
  monkeypatch.setenv("EMD_QUICKSTART_EVAL_SAMPLES", "64")
  monkeypatch.setenv("EMD_QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: one CPU device
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": REPO}})
  client.execute()
  assert os.path.isdir(tmp_path / "run" / "export")
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the grids were displayed
