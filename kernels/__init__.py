"""Triton kernels of gfpo-fast, installed as ``gfpo_fast.kernels`` (imported only when a Triton backend runs,
except :mod:`.fused_linear`, which imports Triton lazily).

* :mod:`.logprobs` -- per-token log-probs / entropies from logits, forward and backward kernels.
* :mod:`.policy_loss` -- the GRPO-family loss from logits: forward kernel, torch reference loss on [B, T],
  backward kernel.
* :mod:`.group_advantages` -- group advantages and the GFPO top-k filter, one program per group.
* :mod:`.fused_linear` -- log-probs and the loss from hidden states and the lm_head weight, chunked.
"""
