"""The backend computes what the NumPy reference computes: eval and training-mode outputs,
running statistics and one SGD step (lr 0.1, softmax cross-entropy, random labels), for zoo
models and per-node-type trap graphs, in every layout (tolerances: see helpers)."""

from __future__ import annotations

import numpy as np
import pytest

import multires

from .cases import DEEP, MODELS, NODES, SPATIAL
from .helpers import (
    Oracle,
    assert_loss,
    assert_noisy,
    assert_output,
    assert_sgd_step,
    to_layout_array,
)


@pytest.fixture(scope="module", params=[*NODES, SPATIAL, *MODELS, *DEEP], ids=lambda case: case.id)
def oracle(request: pytest.FixtureRequest) -> Oracle:
    """One case's reference results, shared by all its tests (pytest groups them by case)."""
    return Oracle(request.param)


@pytest.fixture
def training(oracle: Oracle) -> Oracle:
    """The oracle of a case checked in training mode."""
    if oracle.case.eval_only:
        pytest.skip("checked in eval mode only")
    return oracle


@pytest.fixture
def classifier(training: Oracle) -> Oracle:
    """The oracle of a case with (N, classes) logits; the 4-D output case cannot take an SGD step."""
    if training.case is SPATIAL:
        pytest.skip("a 4-D output has no softmax cross-entropy")
    return training


def test_eval_outputs_match_the_reference(backend: str, layout: str, oracle: Oracle) -> None:
    case = oracle.case
    runner = multires.make_runner(case.graph, oracle.weights, backend, layout)
    out = runner.forward(case.x_in(layout))
    assert np.shape(out) == case.output_shape(layout)
    assert_output(out, oracle.eval_output, layout, f"{case.id} eval ({layout})")


def test_training_outputs_and_running_statistics_match(trainable: str, layout: str, training: Oracle) -> None:
    oracle = training
    case = oracle.case
    runner = multires.make_runner(case.graph, oracle.weights, trainable, layout)
    out = runner.forward(case.x_in(layout), training=True)
    assert np.shape(out) == case.output_shape(layout)
    (name,) = case.graph.outputs
    expected, perturbed = oracle.training, oracle.training_perturbed
    assert_noisy(
        {"output": out},
        {"output": to_layout_array(expected.outputs[name], layout)},
        {"output": to_layout_array(perturbed.outputs[name], layout)},
        1e-4,
        f"{case.id} training-mode output ({layout})",
    )
    after = runner.weights()
    assert_noisy(
        {k: after[k] for k in expected.running},
        expected.running,
        perturbed.running,
        1e-4,
        f"{case.id} running statistics after one training forward ({layout})",
    )
    changed = [
        k for k, v in after.items() if k not in expected.running and not np.array_equal(v, oracle.weights[k])
    ]
    assert not changed, f"a training-mode forward changed weights it must not touch: {changed[:5]}"


def test_one_sgd_step_matches_the_reference(trainable: str, layout: str, classifier: Oracle) -> None:
    case = classifier.case
    runner = multires.make_runner(case.graph, classifier.weights, trainable, layout, multires.SGD(lr=0.1))
    loss, logits = runner.train_step(case.x_in(layout), case.labels)
    assert np.shape(logits) == case.output_shape(layout)
    assert_loss(loss, classifier, f"{case.id} loss ({layout})")
    assert_sgd_step(runner.weights(), classifier)
