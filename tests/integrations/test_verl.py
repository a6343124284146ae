"""gfpo_fast.integrations.verl against verl's own code on the CPU (skipped when verl is not installed).

Tiny transformers models built from configs (nothing from the Hub), patched through verl's real
``apply_monkey_patch``; the losses through verl's real ``ActorConfig`` and ``agg_loss``; GFPO on verl's
``DataProto``. ``bash .ci/verl.sh`` builds the environment these tests run in.
"""
import copy
import math

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: E402
from verl.trainer.ppo import ray_trainer  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import gfpo_fast as gf  # noqa: E402
import gfpo_fast.integrations.verl as gf_verl  # noqa: E402
from gfpo_fast.integrations.verl import compute_gfpo_advantage  # noqa: E402

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
    ("gspo", "token-mean", "gfpo_fast_gspo_dapo", {}),  # GSPO and GSPO-token: the same gradient (one A per row)
    ("gspo", "seq-mean-token-sum", "gfpo_fast_luspo", {}),
    ("cispo", "token-mean", "gfpo_fast_cispo", {"clip_ratio_low": 1.0, "clip_ratio_high": 0.1}),
    ("sapo", "seq-mean-token-mean", "gfpo_fast_sapo", {"tau_pos": 1.3, "tau_neg": 2.0}),
    ("geo_mean", "token-mean", "gfpo_fast_gmpo", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15}),
    ("gpg", "token-mean", "gfpo_fast_gpg", {}),
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
    rho = verl_rho = None
    if name == "gfpo_fast_vespo":  # the rollout correction weights fold into VESPO's weight, as TRL's IS ratio
        rho = torch.where(mask != 0, torch.rand(B, T, generator=torch.Generator().manual_seed(5)) + 0.5, 1.0)
        verl_rho = rho * mask  # verl's are 0 on padding (rollout_corr_helper), TRL's 1
    loss, grad, metrics = run_loss(name, config, inputs, rollout_is_weights=verl_rho)
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
    assert {"gfpo_fast_dapo", "gfpo_fast_luspo", "gfpo_fast_vespo", "gfpo_fast_gspo_grpo", "gfpo_fast_gspo_token_dapo",
            "gfpo_fast_gmpo"} <= set(names)
    assert all(POLICY_LOSS_REGISTRY[name] is not None for name in names)
    verl_own = set(POLICY_LOSS_REGISTRY) - set(names)
    assert {"vanilla", "gspo", "geo_mean", "cispo", "sapo"} <= verl_own
    assert not any(name.startswith("gfpo_fast") for name in verl_own)


# ----------------------------------------------------------------------------- GFPO
# Two prompts of G = 4 responses, their rows interleaved (verl groups by uid, not by position): a0 b0 a1 b1 ...
UIDS = np.array(["a", "b"] * 4, dtype=object)
REWARDS = [1.0, 2.0, 0.0, 2.0, 1.0, 0.0, 0.0, 1.0]
LENGTHS = [5, 1, 2, 6, 3, 1, 4, 3]
T = 6


def gfpo_batch() -> DataProto:
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    token_rewards = torch.zeros(8, T)
    token_rewards[torch.arange(8), torch.tensor(LENGTHS) - 1] = torch.tensor(REWARDS)  # on the last token, as verl
    responses = torch.randint(3, 50, (8, T), generator=torch.Generator().manual_seed(0)) * mask
    return DataProto.from_dict(tensors={"responses": responses, "response_mask": mask,
                                        "token_level_rewards": token_rewards},
                               non_tensors={"uid": UIDS})


def algorithm(**gfpo):
    return OmegaConf.create({"adv_estimator": gf_verl.GFPO_ESTIMATOR, "norm_adv_by_std_in_grpo": True,
                             "gfpo": {"num_remains_in_group": 2, **gfpo}})


def test_gfpo_hand_computed():
    """k = 2 of 4 by length: uid a keeps its rows of length 2 and 3 (rewards 0, 1), uid b those of length 1 (rewards
    2, 0); advantages are (r - mean) / (unbiased std + 1e-4) over the kept rows. Through verl's own
    ray_trainer.compute_advantage, which the module routes to gfpo_filter_batch: only the kept rows remain."""
    out = ray_trainer.compute_advantage(gfpo_batch(), adv_estimator=gf_verl.GFPO_ESTIMATOR, config=algorithm())
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 1.0 / (math.sqrt(2.0) + 1e-4)
    assert list(out.non_tensor_batch["uid"]) == ["b", "a", "a", "b"]  # rows 1, 2, 4, 5 in their order
    expected = torch.tensor([b, -a, a, -b])
    mask = out.batch["response_mask"].float()
    torch.testing.assert_close(out.batch["advantages"], expected[:, None] * mask)
    torch.testing.assert_close(out.batch["returns"], out.batch["advantages"])
    assert mask.sum(-1).tolist() == [1, 2, 3, 1]


def test_gfpo_equals_the_reference_filter():
    """Against gf.gfpo_filter on the rows grouped by uid, for the token-efficiency filter."""
    data = gfpo_batch()
    advantages, keep = gf_verl.gfpo_advantages(data.batch["token_level_rewards"], data.batch["response_mask"],
                                               data.non_tensor_batch["uid"], algorithm(group_filter="token_efficiency"))
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # a's rows, then b's
    rewards, lengths = torch.tensor(REWARDS)[order], torch.tensor(LENGTHS, dtype=torch.float32)[order]
    ref_adv, ref_keep = gf.gfpo_filter(rewards, rewards / lengths, 4, 2)
    assert keep[order].tolist() == ref_keep.tolist()
    torch.testing.assert_close(advantages[order], ref_adv[:, None] * data.batch["response_mask"][order].float())


def gfpo_on_responses(group_completions, group_rewards):
    """A user filter (TRL's contract): keeps the responses with the smallest first token id."""
    return [[-ids[0] for ids in group] for group in group_completions]


def test_gfpo_user_filter_gets_the_response_ids():
    data = gfpo_batch()
    first = data.batch["responses"][:, 0]
    out = gf_verl.gfpo_filter_batch(data, algorithm(group_filter=f"{__name__}:gfpo_on_responses"))
    for uid in "ab":
        rows = [i for i in range(8) if UIDS[i] == uid]
        kept = sorted(rows, key=lambda i: (first[i].item(), i))[:2]
        assert sorted(out.batch["responses"][:, 0][out.non_tensor_batch["uid"] == uid].tolist()) == \
            sorted(first[kept].tolist())


def test_gfpo_adaptive_difficulty():
    """Adaptive k (k0 = 2, G = 4): uid a (mean reward 0.5, the hardest quartile) keeps min(k0 + 2, G - 1) = 3 rows,
    uid b (1.25, the easiest) max(k0 - 1, 2) = 2."""
    out = gf_verl.gfpo_filter_batch(gfpo_batch(), algorithm(adaptive_difficulty=True, group_filter="length"))
    uids = list(out.non_tensor_batch["uid"])
    assert uids.count("a") == 3 and uids.count("b") == 2


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                           "seq-mean-token-sum-norm"])
def test_gfpo_dropped_rows_add_nothing(loss_agg_mode):
    """The registered estimator zeroes the dropped rows' response_mask in place: verl's loss on the whole batch then
    equals its loss on the kept rows only, in value and in gradient (none to a dropped row), for every
    loss_agg_mode, with the token count verl's engine recounts from the mask and the kept rows as the sequence
    count (verl's trainer counts the rows it is given: gfpo_filter_batch removes the dropped ones first)."""
    data = gfpo_batch()
    mask = data.batch["response_mask"]
    advantages, _ = compute_gfpo_advantage(data.batch["token_level_rewards"], mask, index=UIDS, config=algorithm())
    kept = mask.any(-1)
    assert kept.sum() == 4
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(8, T, generator=g)
    logp = (old + 0.2 * torch.randn(8, T, generator=g)).requires_grad_()

    def loss(rows):
        m = mask[rows].float()
        config = actor_config(loss_agg_mode=loss_agg_mode, batch_info={
            "dp_size": 1, "batch_num_tokens": m.sum().item(), "global_batch_size": int(kept.sum())})
        return get_policy_loss_fn("vanilla")(old[rows], logp[rows], advantages[rows], m, loss_agg_mode, config)[0]

    whole, only_kept = loss(slice(None)), loss(kept)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    (grad_kept,) = torch.autograd.grad(only_kept, logp)
    assert whole.abs() > 1e-4
    torch.testing.assert_close(whole, only_kept)
    torch.testing.assert_close(grad_whole, grad_kept)
    assert grad_whole[~kept].abs().max() == 0


def test_gfpo_refuses_a_missing_or_bad_k():
    data = gfpo_batch()
    args = data.batch["token_level_rewards"], data.batch["response_mask"], UIDS
    with pytest.raises(ValueError, match="num_remains_in_group"):
        gf_verl.gfpo_advantages(*args, OmegaConf.create({"adv_estimator": gf_verl.GFPO_ESTIMATOR}))
    with pytest.raises(ValueError):
        gf_verl.gfpo_advantages(*args, algorithm(num_remains_in_group=4))
