"""One process of a multi-process JAX run, launched by `test_flax_parallel.py` (two on localhost).

    python flax_distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUTPUT.npz

It joins the run with `initialize_distributed`, trains the graph of `distributed_case` data
parallel over every process's devices (each process feeds its own rows of the global batches),
and saves what the test compares: the losses, the totals, the weights and whether it is main.
"""

from __future__ import annotations

import sys

import numpy as np

import multires
from multires.backend import SGD
from multires.graph import BatchNorm, Conv2d, Dense, Flatten, GlobalAvgPool, Graph, Input, ReLU

OPTIMIZER = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)


def distributed_case() -> tuple[Graph, dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """A small graph with BatchNorm, its weights and two global batches of 7 (NHWC): uneven over
    two devices, so one shard is padded."""
    nodes = [
        Conv2d("conv", "image", out_channels=6, kernel=3, padding=1, bias=True),
        BatchNorm("bn", "conv", momentum=0.2),
        ReLU("relu", "bn"),
        GlobalAvgPool("gap", "relu"),
        Flatten("flatten", "gap"),
        Dense("fc", "flatten", out_features=4),
    ]
    graph = Graph("distributed", Input("image", 3), nodes, ("fc",))
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(7, 6, 6, 3)).astype(np.float32), rng.integers(0, 4, 7)) for _ in range(2)]
    return graph, multires.random_weights(graph, seed=5, input_shape=(7, 3, 6, 6)), batches


def main(coordinator: str, processes: int, process_id: int, output: str) -> None:
    flax_backend = multires.get_backend("flax")
    flax_backend.initialize_distributed(coordinator, processes, process_id)
    import jax

    graph, weights, batches = distributed_case()
    devices = jax.device_count()
    runner = multires.make_runner(graph, weights, "flax", "NHWC", OPTIMIZER, devices=devices)
    losses = [runner.train_step(x, labels)[0] for x, labels in batches]
    stepped = multires.make_runner(graph, weights, "flax", "NHWC", OPTIMIZER, devices=devices)
    for x, labels in batches:
        stepped.step(stepped.prepare(x, labels))
    totals = stepped.take_totals()
    np.savez(
        output,
        devices=devices,
        local_devices=jax.local_device_count(),
        is_main=runner.is_main,
        losses=np.array(losses),
        totals=np.array(totals, np.float64),
        **{f"weights/{name}": value for name, value in runner.weights().items()},
        **{f"stepped/{name}": value for name, value in stepped.weights().items()},
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
