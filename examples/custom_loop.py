"""A GRPO step in your own loop with gf.GRPOLoss (runs offline on the CPU: `python examples/custom_loop.py`).

The policy is a randomly initialised 2-layer Llama and the reward counts token 7; swap in your model and
reward. For long vocabularies use gf.FusedLinearGRPOLoss on the last hidden states and lm_head weight instead.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gfpo_fast as gf

torch.manual_seed(0)
policy = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0))
opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
loss_fn = gf.GRPOLoss(loss_type="dapo", epsilon_high=0.28, return_entropy=True)
G, prompts = 4, torch.randint(2, 32, (2, 5))                                  # 2 prompts, 4 completions each

for step in range(3):
    prompt = prompts.repeat_interleave(G, dim=0)                               # (B, P), rows [g*G, (g+1)*G) = group g
    with torch.no_grad():
        seq = policy.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=8)
    completion = seq[:, prompt.shape[1]:]                                      # (B, T)
    mask = (completion != 0).float()                                           # padding after EOS is 0
    advantages = gf.group_advantages((completion == 7).sum(1).float(), G)      # (B,)
    logits = policy(seq).logits[:, prompt.shape[1] - 1:-1]                     # (B, T, V): predicts completion
    loss, metrics = loss_fn(logits, completion, None, advantages, mask)        # on-policy: old_logp = None
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(step, f"loss {loss.item():.4f}", {k: round(v.item(), 4) for k, v in metrics.items()})
