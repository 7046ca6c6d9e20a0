"""Runs data-parallel jobs for `test_data_parallel.py` in a fresh process (one per device under
torchrun for torch; with `MULTIRES_CPU_DEVICES` devices for the others), since frameworks fix
their device list when they start.

    python data_parallel_worker.py JOB_DIR

`JOB_DIR/jobs.json` lists the jobs; `JOB_DIR/inputs.npz` holds their arrays. The main process
(rank 0) writes each job's results to `JOB_DIR/<job>.npz`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import multires as mr
from multires.backend import SGD
from multires.data import CLASSES, Dataset
from multires.train import train


def steps(job: dict[str, Any], arrays: Any) -> dict[str, np.ndarray] | None:
    """SGD steps on the job's global batches; the final weights, buffers, losses and first logits."""
    graph = mr.Graph.from_json(job["graph"])
    weights = {k.split("/", 2)[2]: arrays[k] for k in arrays.files if k.startswith(f"{job['name']}/weights/")}
    runner = mr.make_runner(
        graph, weights, job["backend"], job["layout"], SGD(**job["optimizer"]),
        devices=job["devices"], sync_batchnorm=job["sync_batchnorm"],
    )  # fmt: skip
    losses, logits = [], []
    for step, lr in enumerate(job["rates"]):
        runner.set_lr(lr)
        loss, out = runner.train_step(arrays[f"{job['name']}/x{step}"], arrays[f"{job['name']}/y{step}"])
        losses.append(loss)
        logits.append(out)
    if not runner.is_main:
        return None
    results = {f"weights/{k}": v for k, v in runner.weights().items()}
    results |= {f"state/{k}": v for k, v in runner.optimizer_state().items()}
    return results | {"losses": np.array(losses), "logits0": logits[0]}


def trainer(job: dict[str, Any], arrays: Any) -> dict[str, np.ndarray] | None:
    """`multires.train.train` on the job's small data set, writing its run folder."""
    name = job["name"]
    data = tuple(
        Dataset(arrays[f"{name}/{split}_images"], arrays[f"{name}/{split}_labels"], CLASSES)
        for split in ("train", "test")
    )
    history = train(
        mr.Graph.from_json(job["graph"]), job["backend"], data=data, progress=False, **job["settings"]
    )
    if history.runner is None or not history.runner.is_main:
        return None
    return {f"weights/{k}": v for k, v in history.runner.weights().items()}


def main(folder: Path) -> None:
    jobs = json.loads((folder / "jobs.json").read_text())
    with np.load(folder / "inputs.npz", allow_pickle=False) as arrays:
        for job in jobs:
            results = (steps if job["kind"] == "steps" else trainer)(job, arrays)
            if results is not None:
                np.savez(folder / f"{job['name']}.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
