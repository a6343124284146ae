"""The fused-linear policy loss's test inputs and configurations (tests/backends/test_backend_fused_linear.py, the
``token_separable`` tests of tests/test_policy_loss.py) and the projection counter of the path tests (those two)."""
import contextlib

import pytest
import torch

from gfpo_fast import fused_linear
from gfpo_fast.fused_linear import fused_linear_logprobs_ref
from gfpo_fast.policy_loss import LOSS_KEYWORDS, LOSS_REGISTRY, make_loss_config

B, T, H, V = 4, 6, 16, 257
HEAD = dict(temperature=0.9, scale=0.7, softcap=4.0)


def make_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = fused_linear_logprobs_ref(hidden, weight, ids, bias=bias, **HEAD)
    mask = (torch.arange(T) < torch.tensor([6, 4, 1, 0])[:, None]).float()  # ragged, last row fully masked
    tensors = dict(
        old_logp=logp + 0.3 * torch.randn(B, T, generator=g),  # ratios on both sides of the clip range
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.0]),
        ref_logp=logp + 0.2 * torch.randn(B, T, generator=g),
        token_rho=torch.rand(B, T, generator=g) * 2,
        seq_rho=torch.rand(B, generator=g) * 2,
    )
    tensors["token_adv"] = tensors["advantages"][:, None] * torch.linspace(0.5, 1.5, T)
    return (hidden, weight, bias, ids, mask), tensors


def configs():
    """(id, loss keywords with tensor names of make_inputs, on_policy) for every algorithm, level and loss type."""
    out = []
    for on_policy in (False, True):
        pol = "on" if on_policy else "off"
        out += [(f"gmpo-{pol}", dict(algorithm="gmpo"), on_policy),
                (f"gmpo-kl-{pol}", dict(algorithm="gmpo", beta=0.04, ref_logp="ref_logp"), on_policy)]
        for lt, spec in LOSS_REGISTRY.items():
            # cispo's cap well above the ratios (TRL's recommended 5): at the default 0.2 it caps every ratio here
            base = dict(loss_type=lt, max_completion_length=8, **(dict(epsilon_high=5.0) if lt == "cispo" else {}))
            for level in spec.levels:
                out.append((f"{lt}-{level}-{pol}", dict(base, importance_sampling_level=level), on_policy))
            out.append((f"{lt}-kl-rho-{pol}", dict(base, beta=0.04, ref_logp="ref_logp",
                                                   importance_sampling_ratio="token_rho"), on_policy))
        out += [
            (f"grpo-delta-eps-token-adv-{pol}", dict(loss_type="grpo", delta=1.2, epsilon=0.1, epsilon_high=0.28,
                                                     advantages="token_adv"), on_policy),
            (f"dapo-kl-bias-token-{pol}", dict(loss_type="dapo", beta=0.1, ref_logp="ref_logp",
                                               use_bias_correction_kl=True), on_policy),
            (f"dapo-kl-bias-seq-rho-{pol}", dict(loss_type="dapo", beta=0.1, ref_logp="ref_logp",
                                                 use_bias_correction_kl=True, importance_sampling_level="sequence",
                                                 importance_sampling_ratio="seq_rho"), on_policy),
            (f"cispo-ga2-{pol}", dict(loss_type="cispo", epsilon_high=5.0, grad_accum_steps=2,
                                      num_items_in_batch=20), on_policy),
        ]
    return out


CONFIGS = configs()
# the mark of the tests over CONFIGS: their vespo and luspo configs warn that these losses are meant for other settings
CONFIG_WARNINGS = pytest.mark.filterwarnings("ignore:loss_type='(vespo|luspo)' is meant for")


def split(kwargs, tensors, on_policy):
    """``(cfg, (old_logp, advantages), the op's keywords, the other tensors' keywords)`` of one config."""
    kw = dict(kwargs)
    adv = tensors[kw.pop("advantages", "advantages")]
    for name in ("ref_logp", "importance_sampling_ratio"):
        if name in kw:
            kw[name] = tensors[kw[name]]
    cfg = make_loss_config(**{k: v for k, v in kw.items() if k in LOSS_KEYWORDS})
    return cfg, (None if on_policy else tensors["old_logp"], adv), kw, {k: v for k, v in kw.items()
                                                                        if k not in LOSS_KEYWORDS}


@contextlib.contextmanager
def counted_projections():
    """Yields a list that receives the row count of every ``F.linear`` call gfpo_fast.fused_linear makes (one per
    projected chunk) while the block runs; ``F.linear`` is restored on leaving it."""
    rows = []
    linear = fused_linear.F.linear

    def counting_linear(x, *args):
        rows.append(x.shape[0])
        return linear(x, *args)

    fused_linear.F.linear = counting_linear
    try:
        yield rows
    finally:
        fused_linear.F.linear = linear
