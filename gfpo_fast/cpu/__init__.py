"""Python side of the C++ CPU backend (``gfpo_fast._C``, built from ``csrc/``).

Each module here mirrors a family of ``gfpo_fast`` and passes tensor addresses to the
extension after checking that they are contiguous CPU tensors of the expected dtype.
"""
