"""notebooks/colab_tpu.ipynb runs top to bottom on this CPU, with fewer, smaller steps.

The parameters cell is replaced (as papermill would), the install cell must
see tfpar installed and do nothing (no network), and TensorBoard's server is
not started. What the notebook computed is checked against the summaries it
wrote.
"""

import json
import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "colab_tpu.ipynb"


def ci_parameters(model_dir):
    return "\n".join([
        'TFPAR_SOURCE = "tfpar"', f"MODEL_DIR = {str(model_dir)!r}",
        "RESNET50_STEPS = 2", "RESNET50_IMAGE_SIZE = 32", "RESNET50_NUM_CLASSES = 10", "RESNET50_WIDTH = 0.125",
        "PER_REPLICA_BATCH = 8", "DIGITS_EPOCHS = 1", "DIGITS_STEPS = 3", "SHOW_TENSORBOARD = False",
    ])


def test_notebook_has_the_cells_ci_relies_on():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "RESNET50_STEPS" in tagged[0].source
    source = "\n".join(c.source for c in notebook.cells)
    for needed in ('strategy="auto"', 'precision="auto"', 'model="resnet50"', 'model="resnet18"', "[tpu]",
                   '"tensorboard"', "summary_table", "No TPU run"):
        assert needed in source, needed
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "commit it without outputs"


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    model_dir = tmp_path / "runs"
    for c in notebook.cells:
        if "parameters" in c.metadata.get("tags", []):
            c.source = ci_parameters(model_dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # nbclient shuts the kernel down, also on a failing cell

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    install = next(c for c in code_cells if "install_command" in c.source)
    assert "tfpar is installed already; nothing to install." in text(install)

    resnet50 = json.loads((model_dir / "resnet50" / "summary.json").read_text())
    resnet18 = json.loads((model_dir / "resnet18" / "summary.json").read_text())
    assert resnet50["config"]["model"] == "resnet50" and resnet50["steps_done"] == 2
    assert resnet18["config"]["model"] == "resnet18" and resnet18["steps_done"] == 3
    for summary in (resnet50, resnet18):
        assert summary["config"]["strategy"] == "auto" and summary["config"]["precision"] == "auto"
        assert summary["replicas"] == 1 and summary["strategy"] != "TPUStrategy"  # auto on one CPU
        assert summary["precision"] in ("float32", "mixed_bfloat16")
        assert summary["train_loss"] > 0

    tables = [o["data"]["text/markdown"] for c in code_cells for o in c.outputs
              if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
    assert len(tables) == 1
    rows = {line.split("|")[1].strip(): line for line in tables[0].splitlines() if line.startswith("| resnet")}
    assert set(rows) == {"resnet50 synthetic", "resnet18 digits"}
    assert f"{resnet18['train_loss']:.4f}" in rows["resnet18 digits"]
    assert f"{resnet18['val_accuracy']:.3f}" in rows["resnet18 digits"]
    assert resnet50["strategy"] in rows["resnet50 synthetic"]

    tensorboard = next(c for c in code_cells if "SHOW_TENSORBOARD" in c.source and "load_ext" in c.source)
    assert "TensorBoard not started" in text(tensorboard)
    assert list((model_dir / "resnet18").rglob("events.out.tfevents.*"))
