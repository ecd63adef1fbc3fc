"""The exception and warning types bnfix raises."""

from __future__ import annotations

__all__ = ["BnfixError", "BnfixWarning"]


class BnfixError(RuntimeError):
    """A domain failure: the model or the data cannot be recalibrated as asked.

    Bad arguments raise ``ValueError``/``TypeError`` instead; exceptions raised by the user's own
    model or loader propagate unchanged.
    """


class BnfixWarning(UserWarning):
    """Something the caller can act on, about the setup or about one result.

    A misuse (ranks without a process group) or a note about one result (no BN layer,
    class-sorted batches, unused layers, ``auto`` out of data, an EMA that kept most of the old
    statistics...). Notes are also listed in ``report.warnings`` and logged on the ``bnfix`` logger; as warnings
    they can be filtered (``-W``, ``warnings.filterwarnings``) or asserted (``pytest.warns``).
    """
