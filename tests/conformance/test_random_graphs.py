"""Random small graphs (`cases.small_graphs`: convolutions with biases, some offset far from
zero, grouped 1x1 convolutions, pools, BatchNorm with both running-variance conventions) match
the reference in eval mode, in training mode (outputs and running statistics) and over one SGD
step, with the suite's tolerances. Derandomized, so every backend's session checks the same
graphs and their reference results come from the cache."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

import multires

from .cases import small_graphs
from .helpers import Case, Oracle, assert_loss, assert_noisy, assert_output, assert_sgd_step, to_layout_array

EXAMPLES = settings(
    max_examples=6,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EXAMPLES
@given(case=small_graphs())
def test_random_small_graphs_match_the_reference(backend: str, layout: str, case: Case) -> None:
    oracle = Oracle(case)
    runner = multires.make_runner(case.graph, oracle.weights, backend, layout)
    assert_output(runner.forward(case.x_in(layout)), oracle.eval_output, layout, f"{case.id} eval")
    if not getattr(multires.get_backend(backend), "TRAINING", True):
        return
    out = runner.forward(case.x_in(layout), training=True)
    expected, perturbed = oracle.training, oracle.training_perturbed
    assert_noisy(
        {"output": out, **{k: v for k, v in runner.weights().items() if k in expected.running}},
        {"output": to_layout_array(expected.outputs["fc"], layout), **expected.running},
        {"output": to_layout_array(perturbed.outputs["fc"], layout), **perturbed.running},
        1e-4,
        f"{case.id} training mode ({layout}): {case.graph.to_json()}",
    )
    runner = multires.make_runner(case.graph, oracle.weights, backend, layout, multires.SGD(lr=0.1))
    loss, _ = runner.train_step(case.x_in(layout), case.labels)
    assert_loss(loss, oracle, f"{case.id} loss ({layout})")
    assert_sgd_step(runner.weights(), oracle)
