"""Adapters that plug gfpo-fast into other training frameworks.

* :mod:`gfpo_fast.integrations.trl` -- TRL: ``GFPOTrainer``, fast-loss ``GRPOTrainer`` / ``GMPOTrainer``
  subclasses and ``patch(trainer)`` (``pip install 'gfpo-fast[trl]'``).

Each adapter is imported explicitly (``from gfpo_fast.integrations.trl import ...``) so that gfpo-fast
itself never imports the framework.
"""
