"""notebooks/quickstart.ipynb runs top to bottom, headless: a reduced form by default, the full one under --runslow.

The reduced form runs every cell of the notebook as shipped, with its environment knobs set to a tiny untrained
teacher, the `configs/digits.py:tiny` variant, 2 distillation steps and 2 Heun steps; the slow form distils the
shipped digits teacher (2 steps, the default config).
"""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _run_notebook(tmp_path, monkeypatch, env: dict):
  # Required, not skipped: the `test` extra installs them, and CI must really run the notebook.
  import nbclient
  import nbformat

  for k, v in {"EMD_QUICKSTART_STEPS": "2", "EMD_QUICKSTART_WORKDIR": str(tmp_path / "run"), **env}.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: one CPU device
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": REPO}})
  client.execute()
  assert os.path.isfile(tmp_path / "run" / "export" / "generator.json")
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) >= 2  # the teacher grid and the teacher / student comparison were displayed
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "2 distillation steps" in text and "(256, 16, 16, 1) float32" in text, text[-2000:]
  return text


def test_quickstart_notebook_runs_reduced(tmp_path, monkeypatch, tiny_unet_teacher):
  text = _run_notebook(
    tmp_path,
    monkeypatch,
    {
      "EMD_QUICKSTART_TEACHER": tiny_unet_teacher,
      "EMD_QUICKSTART_CONFIG": "tiny",
      "EMD_QUICKSTART_HEUN_STEPS": "2",
      "EMD_QUICKSTART_EVAL_SAMPLES": "16",
    },
  )
  assert "untrained tiny SongUNet" in text  # the notebook used the teacher it was given


@pytest.mark.slow  # about 14 min on 2 busy cores: the shipped teacher's train step compiles slowly on CPU
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  _run_notebook(tmp_path, monkeypatch, {"EMD_QUICKSTART_EVAL_SAMPLES": "64"})
