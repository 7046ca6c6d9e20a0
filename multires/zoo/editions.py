"""The four framework editions of *Dive into Deep Learning*'s ResNet chapter, as data.

The book writes one ResNet in PyTorch, MXNet, TensorFlow and JAX, and the four compute different
functions from the same weights: each framework's `'same'` padding and BatchNorm defaults differ.
An `Edition` pins what `multires.zoo.d2l` needs to reproduce one of them exactly.

| edition   | book code                                   | padding                    | BN eps | BN momentum (framework's) | running variance |
|-----------|---------------------------------------------|----------------------------|--------|---------------------------|------------------|
| `pytorch` | `nn.LazyConv2d(padding=1)`, `LazyBatchNorm2d` | symmetric `k // 2`        | 1e-5   | 0.1                       | unbiased         |
| `mxnet`   | `nn.Conv2D(padding=1)`, `nn.BatchNorm()`      | symmetric `k // 2`        | 1e-5   | 0.9                       | biased           |
| `tf`      | `Conv2D(padding='same')`, `BatchNormalization`| TF SAME (asymmetric at /2) | 1e-3   | 0.99                      | biased           |
| `jax`     | `nn.Conv(padding='same')`, `nn.BatchNorm`     | XLA SAME (asymmetric at /2)| 1e-5   | 0.99                      | biased           |

Keras, Flax and MXNet take `momentum` as the weight of the old running value; the spec's is the
weight of the new batch statistic (PyTorch's), so 0.99 there is 0.01 here and 0.9 is 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multires.errors import SpecError


@dataclass(frozen=True)
class Edition:
    """What one framework edition of the book's ResNet computes differently."""

    name: str
    same_padding: bool
    """True: every 'same' conv and pool of the book is TF/XLA SAME; False: symmetric `k // 2`."""
    eps: float
    momentum: float
    """The spec's (PyTorch's) momentum: the weight of the new batch statistic."""
    running_variance: str
    """"unbiased" (PyTorch) or "biased" (MXNet, Keras, Flax)."""

    def padding(self, kernel: int) -> Any:
        """The padding of the book's 'same'-padded `kernel` x `kernel` conv or pool."""
        return "same" if self.same_padding else kernel // 2

    def bn_options(self) -> dict[str, Any]:
        """Keyword arguments of `GraphBuilder.bn` for this edition's BatchNorm."""
        return {"eps": self.eps, "momentum": self.momentum, "running_variance": self.running_variance}


EDITIONS: dict[str, Edition] = {
    "pytorch": Edition("pytorch", same_padding=False, eps=1e-5, momentum=0.1, running_variance="unbiased"),
    "mxnet": Edition("mxnet", same_padding=False, eps=1e-5, momentum=0.1, running_variance="biased"),
    "tf": Edition("tf", same_padding=True, eps=1e-3, momentum=0.01, running_variance="biased"),
    "jax": Edition("jax", same_padding=True, eps=1e-5, momentum=0.01, running_variance="biased"),
}


def edition(name: str | Edition) -> Edition:
    """The `Edition` called `name` ("pytorch", "mxnet", "tf" or "jax")."""
    if isinstance(name, Edition):
        return name
    if name not in EDITIONS:
        raise SpecError(f"unknown edition {name!r} of the book's ResNet; choose one of {sorted(EDITIONS)}.")
    return EDITIONS[name]
