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
from verl.utils.experimental import torch_functional  # noqa: E402

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
