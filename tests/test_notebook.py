"""The Colab notebook runs top to bottom on CPU (tiny random pair, tiny settings) and writes its outputs."""
import json
import os
from pathlib import Path

import nbformat
import numpy as np
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finextract_colab.ipynb"


def _kernel_manager(tmp_path):
    """A kernel of this interpreter, from a kernelspec written to a temp folder (none need be registered)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "python3")  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    return KernelManager(kernel_name="python3",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("FINEXTRACT_CACHE", "")
    # Two CPU devices, so that the extraction really shards its batches over several devices.
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    workdir, train = tmp_path / "work", tmp_path / "train"
    train.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(train / f"train{i}.png")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'PRETRAINED = ""' in params.source  # the committed default: the self-contained tiny demo
    params.source += (f"\nWORKDIR = {str(workdir)!r}\nTRAIN_DIR = {str(train)!r}\n"
                      "NUM_IMAGES = 8\nSTEPS = 3\nBATCH_PER_DEVICE = 2\n")
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "FineXtract done: " in text, text
    summary = json.loads(text.split("FineXtract done: ", 1)[1].strip())
    assert summary["demo"] and summary["devices"] == 2 and summary["images"] == 8
    assert -1.0 <= summary["AS"] <= 1.0 and 0.0 <= summary["A_ESR"] <= 1.0

    assert sorted(n for n in os.listdir(workdir / "images") if not n.startswith(".")) == [f"{i:05d}.png" for i in range(8)]
    run = json.loads((workdir / "run.json").read_text())
    assert run["status"] == "complete" and run["settings"]["batch_size"] == 4
    clusters = json.loads((workdir / "clusters.json").read_text())
    assert {"threshold", "cliques", "representatives", "images", "timing"} <= set(clusters)
    assert len(clusters["cliques"]) >= 2 == len(os.listdir(train))  # N0 from TRAIN_DIR
    assert all(r in c for r, c in zip(clusters["representatives"], clusters["cliques"]))
    assert sorted(os.listdir(workdir / "extracted")) == sorted(
        clusters["images"][r] for r in clusters["representatives"])
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert [p["train"] for p in metrics["per_image"]] == ["train0.png", "train1.png"]
    for name in ("grid.png", "samples.png", "pairs.png"):
        with Image.open(workdir / name) as img:
            assert img.width > 0
    # The grids are shown inline.
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 3
