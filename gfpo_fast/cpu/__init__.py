"""Python side of the C++ CPU backend (``gfpo_fast._C``, built from ``csrc/``).

Each module here mirrors a family of ``gfpo_fast`` and passes tensor addresses and sizes to the
extension (zero-copy) after making sure they are CPU tensors of the expected dtype and layout:
contiguous, except logits, whose rows may be strided as long as the vocab dimension is contiguous.
The kernels run ``torch.get_num_threads()`` OpenMP threads.
"""
