"""gfpo_fast.integrations.verl against verl's own code on the CPU (skipped when verl is not installed).

Tiny transformers models built from configs (nothing from the Hub), patched through verl's real
``apply_monkey_patch``; the losses through verl's real ``ActorConfig`` and ``agg_loss``; GFPO on verl's
``DataProto``. ``bash .ci/verl.sh`` builds the environment these tests run in.
"""
import copy

import pytest
import torch

verl = pytest.importorskip("verl")

from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import gfpo_fast as gf  # noqa: E402
import gfpo_fast.integrations.verl as gf_verl  # noqa: E402

TEMPERATURE = 0.7


def tiny_llama(vocab=300, bias=False, **extra):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra)
    model = LlamaForCausalLM(config).float()
    if bias:
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
    return model


def patched(model, backend):
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend=backend)
    return model


def fused_forward(model, ids):
    """verl's fused forward: ``(log_probs, entropy, output)`` at :data:`TEMPERATURE`."""
    B, T = ids.shape
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(T).expand(B, T),
                temperature=TEMPERATURE, return_dict=True)
    return out.log_probs, out.entropy


def values_and_grads(model, ids):
    logp, entropy = fused_forward(model, ids)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(logp.shape, generator=g), torch.randn(entropy.shape, generator=g)
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    return logp.detach(), entropy.detach(), {name: p.grad for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------- version
def test_version_range():
    gf_verl.check_verl_version(verl.__version__)
    for outside in ("0.8.0", "0.10.0"):
        with pytest.raises(ImportError, match=f"verl{gf_verl.SUPPORTED_VERL}"):
            gf_verl.check_verl_version(outside)


# ----------------------------------------------------------------------------- fused log-probs and entropy
def test_backend_equals_verl_torch_backend():
    """Log-probs, entropies and every parameter's gradient through verl's fused forward: gfpo-fast's backend equals
    verl's FusedLinearForPPO (2 x 300 tokens: more than verl's 512-token chunk)."""
    ours = patched(tiny_llama(), gf_verl.BACKEND)
    theirs = patched(copy.deepcopy(ours), "torch")
    assert isinstance(ours._verl_fused_kernels_backend, gf_verl.HeadBackend)
    ids = torch.randint(0, 300, (2, 300), generator=torch.Generator().manual_seed(2))
    logp, entropy, grads = values_and_grads(ours, ids)
    ref_logp, ref_entropy, ref_grads = values_and_grads(theirs, ids)
    assert logp.dtype == torch.float32 and logp.shape == ids.shape
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max()
        assert ((grad - ref_grads[name]).abs().max() / scale) < 1e-5, name


def test_backend_applies_the_soft_cap():
    """Gemma 2 soft-caps its logits: gfpo-fast's backend gives the model's own distribution (verl's torch backend,
    which reads lm_head.weight only, does not)."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits well past the cap
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # the model's own forward, soft-capped
        expected = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids.roll(-1, -1).unsqueeze(-1)).squeeze(-1)
    ours = patched(model, gf_verl.BACKEND)
    assert ours._verl_fused_kernels_backend.softcap == 2.0
    with torch.no_grad():
        logp, _ = fused_forward(ours, ids)
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
        ours._verl_fused_kernels_backend = "torch"  # verl's own backend on the same model
        uncapped, _ = fused_forward(ours, ids)
    assert (uncapped - expected).abs().max() > 0.1


def test_refuses_a_head_it_cannot_reproduce():
    with pytest.raises(ValueError, match="lm_head has a bias"):
        patched(tiny_llama(bias=True), gf_verl.BACKEND)
    with pytest.raises(ValueError, match="sets logit_scale=2.0"):
        patched(tiny_llama(logit_scale=2.0), gf_verl.BACKEND)


def test_other_backends_stay_verls():
    module = torch_functional.FusedLinearForPPO(impl_backend="torch")
    assert type(module) is gf_verl._verl_fused_linear_for_ppo
    model = patched(tiny_llama(), "torch")
    assert model._verl_fused_kernels_backend == "torch" and not isinstance(model._verl_fused_kernels_backend,
                                                                            gf_verl.HeadBackend)


# ----------------------------------------------------------------------------- losses
def actor_config(loss_mode="vanilla", loss_agg_mode="token-mean", batch_info=None, **fields):
    """verl's real ActorConfig (its loss call reads clip ratios, taus and global_batch_info); ``batch_info`` goes
    into global_batch_info with the actor's loss_scale_factor, as verl's engine puts them there."""
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=loss_agg_mode,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode), **fields)
    if batch_info:
        config.global_batch_info.update(batch_info, loss_scale_factor=config.loss_scale_factor)
    return config


def loss_inputs(B=6, T=9, seed=0, spread=0.3, empty_row=True):
    """Random verl loss inputs: log-probs near the old ones (ratios inside verl's dual clip), token-level advantages
    (one value per row, on its tokens, as verl's estimators give them), a ragged mask, with an empty row 1."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + spread * torch.randn(B, T, generator=g)).requires_grad_()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0 if empty_row else lengths[1]
    mask = (torch.arange(T) < lengths[:, None]).float()
    adv = (torch.randn(B, 1, generator=g) + 0.5) * mask
    return old, logp, adv, mask


def run_loss(name, config, inputs, loss_agg_mode=None, **kw):
    old, logp, adv, mask = inputs
    logp.grad = None
    loss, metrics = get_policy_loss_fn(name)(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                             loss_agg_mode=loss_agg_mode or config.loss_agg_mode, config=config, **kw)
    loss.backward()
    return loss.detach(), logp.grad.clone(), metrics


# verl's mode, its loss_agg_mode, the registered loss with the same math (verl and TRL agree there), extra fields
SAME_MATH = [
    ("vanilla", "token-mean", "gfpo_fast_dapo", {}),
    ("vanilla", "seq-mean-token-mean", "gfpo_fast_grpo", {}),
    ("vanilla", "seq-mean-token-sum-norm", "gfpo_fast_dr_grpo", {}),
    ("vanilla", "seq-mean-token-sum-norm", "gfpo_fast_dr_grpo", {"loss_scale_factor": 16}),
    ("gspo", "token-mean", "gfpo_fast_gspo_token_dapo", {}),
    ("gspo", "seq-mean-token-mean", "gfpo_fast_gspo_token_grpo", {}),
    ("gspo", "seq-mean-token-mean", "gfpo_fast_gspo_grpo", {}),
    ("gspo", "seq-mean-token-sum-norm", "gfpo_fast_gspo_token_dr_grpo", {}),
    ("cispo", "token-mean", "gfpo_fast_cispo", {"clip_ratio_low": 1.0, "clip_ratio_high": 0.1}),
    ("sapo", "seq-mean-token-mean", "gfpo_fast_sapo", {"tau_pos": 1.3, "tau_neg": 2.0}),
    ("geo_mean", "token-mean", "gfpo_fast_gmpo", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15}),
]
# A micro-batch of a larger mini-batch on one of two data-parallel ranks, as verl's engine describes it.
MICRO_OF_MINI = {"dp_size": 2, "batch_num_tokens": 131, "global_batch_size": 24}


@pytest.mark.parametrize("batch_info", [None, MICRO_OF_MINI], ids=["whole-batch", "micro-batch"])
@pytest.mark.parametrize("verl_mode,agg,ours,fields", SAME_MATH,
                         ids=[f"{m}-{a}-{o}{'-' + str(f) if f else ''}" for m, a, o, f in SAME_MATH])
def test_registered_loss_equals_verls_where_the_math_is_the_same(verl_mode, agg, ours, fields, batch_info):
    if verl_mode == "geo_mean" and batch_info:
        pytest.skip("verl's geo_mean averages over the micro-batch's rows, whatever the global batch (docs/verl.md)")
    # Without global_batch_size verl's sequence modes divide by the non-empty rows, TRL by all rows; verl's trainer
    # always passes it.
    inputs = loss_inputs(empty_row=batch_info is not None)
    config = actor_config(loss_agg_mode=agg, batch_info=batch_info, **fields)
    loss, grad, _ = run_loss(verl_mode, config, inputs)
    ref_loss, ref_grad, _ = run_loss(ours, config, inputs)
    assert loss.abs() > 1e-3 and grad.abs().max() > 1e-4  # the case is not degenerate
    torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref_grad, grad, rtol=1e-5, atol=1e-7)


# registered loss -> gfpo-fast's policy_loss keywords (TRL's GRPOConfig fields), the oracle
TRL_SEMANTICS = {
    "gfpo_fast_bnpo": dict(loss_type="bnpo"),
    "gfpo_fast_dapo": dict(loss_type="dapo"),
    "gfpo_fast_dr_grpo": dict(loss_type="dr_grpo"),
    "gfpo_fast_luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "gfpo_fast_gspo_dapo": dict(loss_type="dapo", importance_sampling_level="sequence"),
    "gfpo_fast_gspo_token_bnpo": dict(loss_type="bnpo", importance_sampling_level="sequence_token"),
    "gfpo_fast_vespo": dict(loss_type="vespo"),
    "gfpo_fast_cispo": dict(loss_type="cispo"),
    "gfpo_fast_gmpo": dict(algorithm="gmpo"),
}


@pytest.mark.parametrize("name", list(TRL_SEMANTICS))
def test_registered_loss_has_trl_semantics(name):
    """Through verl's call on a micro-batch of a larger mini-batch: TRL's loss (gfpo-fast's reference) with
    P = dp_size, GA = global rows / (P * micro rows), num_items_in_batch = the global token count and L_max =
    loss_scale_factor; epsilon / epsilon_high from clip_ratio_low / high (1 + clip_ratio_high for CISPO's cap)."""
    B, T = 6, 9
    old, logp, adv, mask = inputs = loss_inputs(B, T, seed=1, spread=0.6)
    config = actor_config(batch_info=MICRO_OF_MINI, loss_scale_factor=12, clip_ratio_low=0.15, clip_ratio_high=0.25)
    rho = None
    if name == "gfpo_fast_vespo":  # the rollout correction weights fold into VESPO's weight, as TRL's IS ratio
        rho = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) + 0.5
    loss, grad, metrics = run_loss(name, config, inputs, rollout_is_weights=rho)
    kw = dict(TRL_SEMANTICS[name])
    per_seq = kw.get("algorithm") == "gmpo" or kw.get("loss_type") == "vespo"
    eps_high = 1.25 if kw.get("loss_type") == "cispo" else 0.25
    logp.grad = None
    ref, ref_metrics = gf.policy_loss(logp, old, adv[:, 0] if per_seq else adv, mask, epsilon=0.15,
                                      epsilon_high=eps_high, num_processes=2, grad_accum_steps=2,
                                      num_items_in_batch=131, max_completion_length=12,
                                      importance_sampling_ratio=rho, **kw)
    ref.backward()
    assert loss.abs() > 1e-3
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-6, atol=1e-7)
    assert metrics == {f"actor/{k}": v.item() for k, v in ref_metrics.items()}


def test_registered_names_do_not_collide():
    names = [f"gfpo_fast_{name}" for name in gf_verl.POLICY_LOSSES]
    assert all(POLICY_LOSS_REGISTRY[name] is not None for name in names)
    verl_own = set(POLICY_LOSS_REGISTRY) - set(names)
    assert {"vanilla", "gspo", "geo_mean", "cispo", "sapo"} <= verl_own
    assert not any(name.startswith("gfpo_fast") for name in verl_own)
