"""The core must import, build specs, count and run the reference without any framework."""

import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "mxnet", "onnx", "onnxruntime")


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, multires\n"
        "g = multires.spec('d2l_resnet18')\n"
        "multires.summarize(g, (1, 1, 96, 96))\n"
        "w = multires.init_weights(g, 0)\n"
        "import numpy as np\n"
        "multires.reference.run(g, w, np.zeros((1, 1, 32, 32), np.float32))\n"
        "multires.backends()\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
