"""Adapters that plug gfpo-fast into other training frameworks.

* :mod:`gfpo_fast.integrations.trl` -- TRL: ``GFPOTrainer``, fast-loss ``GRPOTrainer`` / ``GMPOTrainer``
  subclasses and ``patch(trainer)`` (``pip install 'gfpo-fast[trl]'``).
* :mod:`gfpo_fast.integrations.verl` -- verl: the fused log-prob backend ``gfpo_fast``, the ``gfpo_fast_*``
  policy losses and the ``gfpo_fast_gfpo`` advantage estimator, registered on import
  (``pip install 'gfpo-fast[verl]'``).

Each adapter is imported explicitly (``from gfpo_fast.integrations.trl import ...``) so that gfpo-fast
itself never imports the framework.
"""
