"""Typed exceptions. Each also subclasses the builtin a user would expect to catch."""

from __future__ import annotations


class MultiresError(Exception):
    """Base class of every error multires raises on purpose."""


class SpecError(MultiresError, ValueError):
    """An invalid graph: the message names the node, the rule, the value and the fix."""


class ShapeError(MultiresError, ValueError):
    """An input whose shape or layout does not fit the model."""


class WeightsError(MultiresError, ValueError):
    """Weights that do not match a graph, or a corrupt weight file."""


class BackendNotFoundError(MultiresError, LookupError):
    """A backend name nobody registered."""


class BackendUnavailableError(MultiresError, ImportError):
    """A registered backend whose framework is not installed."""


class ModelNotFoundError(MultiresError, LookupError):
    """A model name the zoo does not know."""


class DataError(MultiresError, ValueError):
    """A data set file that is missing, truncated, corrupt or not the one expected."""


class TrainingError(MultiresError, ValueError):
    """A training run that cannot start or resume: a bad setting, or a checkpoint that is corrupt
    or does not match the run resuming it."""


class InterchangeError(MultiresError, ValueError):
    """A model or checkpoint of another library that multires cannot map: the message says which
    families and variants are supported and how to pass `graph=` for other models."""


class DeviceError(MultiresError, ValueError):
    """A device, device count or precision the framework build or the machine cannot provide: the
    message lists the devices that exist and how to expose more."""
