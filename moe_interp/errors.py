"""Exception types. Every error the package raises on purpose derives from :class:`MoEInterpError`."""

from __future__ import annotations


class MoEInterpError(Exception):
    """Base class of all moe_interp errors."""


class UnsupportedModelError(MoEInterpError, TypeError):
    """The model is not a Mixture-of-Experts model, or its architecture is not registered."""


class DataError(MoEInterpError, ValueError):
    """A data file, record or field is missing or malformed."""


class InputError(MoEInterpError, ValueError):
    """A prompt, span or argument given to a public function is invalid."""


class RecordingError(MoEInterpError, RuntimeError):
    """A hook expected to fire during the forward pass did not (the model was wrapped or patched)."""
