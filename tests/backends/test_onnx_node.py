"""An exported model outside Python: `multires export` writes an ONNX file that onnxruntime-node
(Node.js, ONNX Runtime's C++ core) runs, and its outputs match the NumPy reference.

This is how the book's DJL (Java) edition and other runtimes would use a multires model. The npm
package is installed with `--ignore-scripts` (its install script downloads a CUDA add-on, which
fails offline; the CPU binary ships inside the package) into a cache folder reused across runs
(`MULTIRES_NODE_CACHE`). Skipped where node or npm is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import multires
from multires import reference
from multires.cli import main

ORT_NODE = "onnxruntime-node@1.30.0"
"""The npm package, pinned (its ONNX Runtime core is 1.30)."""

RUN_JS = """
const fs = require("fs");
const ort = require("onnxruntime-node");
const [model, input, dims, output] = process.argv.slice(2);
(async () => {
  const session = await ort.InferenceSession.create(model);
  const bytes = fs.readFileSync(input);
  const x = new ort.Tensor("float32", new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4),
                           JSON.parse(dims));
  const result = await session.run({ [session.inputNames[0]]: x });
  const y = result[session.outputNames[0]];
  fs.writeFileSync(output, Buffer.from(y.data.buffer, y.data.byteOffset, y.data.byteLength));
  console.log(JSON.stringify({ dims: y.dims, version: ort.env.versions.common }));
})().catch((error) => { console.error(error); process.exit(1); });
"""

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The folder whose node_modules holds onnxruntime-node, installed once per cache folder."""
    default = Path(tempfile.gettempdir()) / f"multires-{ORT_NODE.replace('@', '-')}"
    folder = Path(os.environ.get("MULTIRES_NODE_CACHE", default))
    if not (folder / "node_modules" / "onnxruntime-node" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [
                "npm",
                "install",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(folder),
                ORT_NODE,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"npm install {ORT_NODE} failed:\n{done.stderr[-2000:]}"
    return folder / "node_modules"


def test_onnxruntime_node_runs_the_export_as_the_reference(node_modules: Path, tmp_path: Path) -> None:
    graph = multires.spec("d2l_resnet18")
    weights = multires.random_weights(graph, seed=3)
    multires.weights.save(weights, tmp_path / "w.safetensors", graph)
    assert (
        main(
            [
                "export",
                "d2l_resnet18",
                "--weights",
                str(tmp_path / "w.safetensors"),
                "-o",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 0
    )
    x = np.random.default_rng(0).standard_normal((2, 1, 45, 45), dtype=np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "run.js").write_text(RUN_JS)
    done = subprocess.run(
        [
            "node",
            str(tmp_path / "run.js"),
            str(tmp_path / "m.onnx"),
            str(tmp_path / "x.bin"),
            json.dumps(list(x.shape)),
            str(tmp_path / "y.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["dims"] == [2, 10]
    y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(2, 10)
    expected = reference.run(graph, weights, x)
    assert reference.relative_error(y, expected) < 1e-5
