"""Framework integrations: recalibrate BatchNorm statistics as the last step of training.

One module per framework, each importing its framework only when it is itself imported, so
``import bnfix`` (and ``import bnfix.integrations``) never pulls in Lightning or transformers:

* :mod:`bnfix.integrations.lightning`: ``RecalibrateBN``, a Lightning ``Callback``
  (``pip install bnfix[lightning]``).
* :mod:`bnfix.integrations.transformers`: ``RecalibrateBNCallback``, a Hugging Face
  ``TrainerCallback`` (``pip install bnfix[transformers]``).

Why callbacks: fine-tuning and weight averaging leave BatchNorm running statistics that no longer
match the final weights, and the frameworks either run their BN update as an extra epoch (Lightning's
``StochasticWeightAveraging``, which breaks with ``max_steps`` or ``max_epochs=-1``:
Lightning-AI/pytorch-lightning#7710, #21347), leave it to the user (``WeightAveraging``) or have none
(``transformers.Trainer``). Adding one callback makes the checkpoint the user is left with hold exact
statistics.
"""

from __future__ import annotations

__all__: list[str] = []
