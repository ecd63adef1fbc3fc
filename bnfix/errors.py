"""The exception and warning types bnfix raises."""

from __future__ import annotations

__all__ = ["BnfixError", "BnfixWarning"]


class BnfixError(RuntimeError):
    """A domain failure: the model or the data cannot be recalibrated as asked.

    Bad arguments raise ``ValueError``/``TypeError`` instead; exceptions raised by the user's own
    model or loader propagate unchanged.
    """


class BnfixWarning(UserWarning):
    """A misuse that ``warnings`` should surface once per process (ranks without a process group).

    Notes about one result (class-sorted batches, unused layers, skipped batches...) are not
    warnings of this kind: they are listed in ``report.warnings`` and logged on the ``bnfix``
    logger, so they reach users who never look at the report.
    """
