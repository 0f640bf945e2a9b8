"""Exceptions raised by depass_lens.

Every error names what was wrong and, where it helps, what to do instead. They subclass the
built-in exception a caller would already catch (``ValueError``, ``NotImplementedError``), so
generic handlers keep working.
"""

from __future__ import annotations


class DePassError(Exception):
    """Base class of every error raised on purpose by depass_lens."""


class DePassInputError(DePassError, ValueError):
    """The input (tokens, positions, targets, layers, components) cannot be used as given."""


class CacheMismatchError(DePassError, ValueError):
    """An ``ActivationCache`` does not belong to this model and this input, or is incomplete."""


class LosslessnessError(DePassError, RuntimeError):
    """Propagated components stopped summing to the real activations (the DePass invariant)."""


class UnsupportedModelError(DePassError, NotImplementedError):
    """The model uses a setting that DePass cannot propagate exactly; the message names it."""
