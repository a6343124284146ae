"""The one bad-token-id rule, checked the same way on every backend (``tests/test_logprobs.py``: torch and
C++; ``tests/backends/test_backend_logprobs.py``: every fast backend): an id outside ``[0, V)``, masked
position or not, is a ``ValueError`` naming ``token_ids`` from every op that takes ids, raised before anything
is launched."""
import pytest
import torch

import gfpo_fast as gf

B, T, H, V = 2, 3, 4, 7


def ops(backend, device):
    """name -> call(ids) for every public op that reads token ids."""
    logits = torch.randn(B, T, V, device=device)
    hidden, weight = torch.randn(B, T, H, device=device), torch.randn(V, H, device=device)
    mask = torch.ones(B, T, device=device)
    mask[1, 2] = 0
    adv = torch.ones(B, device=device)
    return {
        "token_logprobs": lambda ids: gf.token_logprobs(logits, ids, backend=backend),
        "fused_policy_loss": lambda ids: gf.fused_policy_loss(logits, ids, None, adv, mask, backend=backend),
        "fused_linear_logprobs": lambda ids: gf.fused_linear_logprobs(hidden, weight, ids, backend=backend),
        "fused_linear_policy_loss": lambda ids: gf.fused_linear_policy_loss(hidden, weight, ids, None, adv, mask,
                                                                            backend=backend),
    }


# (op, bad id, where): a -100 label left at a masked position, and an id equal to V at a kept one.
CASES = [(op, bad, where) for op in ("token_logprobs", "fused_policy_loss", "fused_linear_logprobs",
                                     "fused_linear_policy_loss")
         for bad, where in [(-100, (1, 2)), (V, (0, 1))]]


def check_rejected(backend, device, op, bad, where):
    ids = torch.randint(0, V, (B, T), device=device)
    ids[where] = bad
    vocab_of = "weight" if op.startswith("fused_linear") else "logits"
    with pytest.raises(ValueError, match=rf"token_ids must lie in \[0, {V}\) \(the vocab size of {vocab_of}\), "
                                         rf"got values in \[-?\d+, \d+\]"):
        ops(backend, device)[op](ids)
