"""Inputs and TRL-computed reference values (float32, one process; docs/semantics.md section 14).

Regenerate or check the numbers from an installed TRL with ``python tests/make_spec_fixtures.py [--check]``
(the GSPO-token rows need TRL <= 1.13 and are kept as committed)."""
import torch

MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
LOGP = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -5.0], [-2.5, -0.05, -3.0, -3.0],
                     [-0.9, -4.0, -4.0, -4.0]])
OLD_LOGP = LOGP + torch.tensor([[0.1, -0.3, 0.25, 0], [-0.2, 0.05, 0.4, 0], [0.3, -0.1, 0, 0], [-0.5, 0, 0, 0]])
REF_LOGP = LOGP + torch.tensor([[0.2, 0.1, -0.1, 0.05], [0, 0.3, -0.2, 0], [0.1, 0.1, 0, 0], [0.4, 0, 0, 0]])
ADVANTAGES = torch.tensor([1.0, -0.5, 0.5, -1.0])
TOKEN_RHO = torch.tensor([[1, 0.5, 2, 1], [1, 1, 0, 1], [1.5, 1, 1, 1], [0.8, 1, 1, 1]])
SEQUENCE_RHO = torch.tensor([1.2, 0.0, 2.0, 1.0])
COMMON = dict(num_items_in_batch=10, max_completion_length=8)

# (id, policy_loss keywords, loss, sum of dloss/dlogp, metrics to check)
LOSS_TABLE = [
    ("grpo-token", dict(loss_type="grpo"), 0.177938, 0.219605,
     {"clip_ratio/low_mean": 0.1, "clip_ratio/high_mean": 0.1, "clip_ratio/region_mean": 0.2,
      "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.25}),
    ("grpo-sequence", dict(loss_type="grpo", importance_sampling_level="sequence"), 0.167187, 0.167187,
     {"clip_ratio/region_mean": 0.0}),
    ("bnpo-token", dict(loss_type="bnpo"), -0.167160, -0.087160, {}),
    ("dr_grpo-token", dict(loss_type="dr_grpo"), -0.052237, -0.027237, {}),
    ("dapo-token", dict(loss_type="dapo"), -0.167160, -0.087160, {}),
    ("dapo-token-ga2", dict(loss_type="dapo", grad_accum_steps=2), -0.167160, -0.087160, {}),
    ("dapo-sequence", dict(loss_type="dapo", importance_sampling_level="sequence"), -0.182636, -0.182636, {}),
    ("grpo-token-ga2", dict(loss_type="grpo", grad_accum_steps=2), 0.088969, 0.109802, {}),
    ("cispo-eps_high5", dict(loss_type="cispo", epsilon_high=5.0), 0.171861, -0.188629, {"cispo_clip_ratio": 0.0}),
    ("cispo-default-cap", dict(loss_type="cispo"), 0.057500, -0.050000, {"cispo_clip_ratio": 0.6}),
    ("sapo-token", dict(loss_type="sapo"), 0.121632, 0.121507, {}),
    ("luspo-sequence", dict(loss_type="luspo", importance_sampling_level="sequence"), -0.456590, -0.456590, {}),
    ("vespo-token", dict(loss_type="vespo"), 0.333203, -0.301692, {"vespo/phi_seq_mean": 1.0405}),
    ("grpo-delta", dict(loss_type="grpo", delta=1.1), 0.071439, -0.174394, {"clip_ratio/high_mean": 0.0}),
    ("grpo-eps_high", dict(loss_type="grpo", epsilon_high=0.28), 0.172938, 0.219605, {}),
    ("grpo-kl", dict(loss_type="grpo", beta=0.04, ref_logp=REF_LOGP), 0.179219, 0.212366, {"kl": 0.0203}),
    ("dapo-kl-bias-corrected", dict(loss_type="dapo", beta=0.04, ref_logp=REF_LOGP, use_bias_correction_kl=True),
     -0.166150, -0.092293, {"kl": 0.0252}),
    ("dapo-token-rho", dict(loss_type="dapo", importance_sampling_ratio=TOKEN_RHO), -0.276534, -0.216534, {}),
    ("vespo-token-rho", dict(loss_type="vespo", importance_sampling_ratio=TOKEN_RHO), 0.364951, -0.373801,
     {"vespo/phi_seq_mean": 0.7552}),
    ("grpo-sequence-rho", dict(loss_type="grpo", importance_sampling_ratio=SEQUENCE_RHO), -0.109841, -0.019841, {}),
    ("grpo-sequence-tiny-eps", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
                                    epsilon_high=4e-4), 0.177144, 0.052181, {"clip_ratio/region_mean": 0.25}),
    ("gmpo-eps0.4", dict(algorithm="gmpo", epsilon=0.4), 0.167187, 0.167187, {}),
    ("gmpo-default-eps", dict(algorithm="gmpo"), 0.167187, 0.167187, {}),
    ("gmpo-eps0.1", dict(algorithm="gmpo", epsilon=0.1), 0.191323, 0.264222,
     {"clip_ratio/low_mean": 0.1, "clip_ratio/high_mean": 0.2, "clip_ratio/region_mean": 0.3,
      "clip_ratio/high_max": 0.5}),
    ("gmpo-eps0.1-kl", dict(algorithm="gmpo", epsilon=0.1, beta=0.04, ref_logp=REF_LOGP), 0.192603, 0.256983, {}),
    ("gspo_token-grpo", dict(loss_type="grpo", importance_sampling_level="sequence_token"), 0.167187, 0.167187, {}),
    ("gspo_token-dapo", dict(loss_type="dapo", importance_sampling_level="sequence_token"), -0.182636, -0.182636, {}),
]

# Loss types TRL does not have, as LOSS_TABLE, with values computed by hand (docs/semantics.md sections 8 and 9).
# gpg: -sum_i A_i sum_t M lp (rho) / N with N = 10: 2.875 / 10, and dL/dlp = -A_i M (rho) / N, summed -2.5 / 10;
# with TOKEN_RHO 5.78 / 10 and -3.95 / 10.
HAND_TABLE = [
    ("gpg-token", dict(loss_type="gpg"), 0.2875, -0.25, {}),
    ("gpg-token-rho", dict(loss_type="gpg", importance_sampling_ratio=TOKEN_RHO), 0.578, -0.395, {}),
]
