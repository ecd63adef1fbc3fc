"""The exception and warning types bnfix raises."""

from __future__ import annotations

__all__ = ["BnfixError", "BnfixWarning"]


class BnfixError(RuntimeError):
    """A domain failure: the model or the data cannot be recalibrated as asked.

    Bad arguments raise ``ValueError``/``TypeError`` instead; exceptions raised by the user's own
    model or loader propagate unchanged.
    """


class BnfixWarning(UserWarning):
    """Something the user should know about the result (class-sorted batches, unused layers...)."""
