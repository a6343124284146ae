"""The fused-linear ops with a model's output layer (gfpo_fast/lm_head.py, the scale and softcap of
gfpo_fast/fused_linear.py): on the torch, C++ and Triton (interpreter on CPU) backends, values and gradients
equal the reference, and on tiny transformers models built from configs (no downloads) they equal
``log_softmax`` of the model's own logits through autograd, to the hidden states, the lm_head weight (tied or
not), its bias and the LoRA A / B of a peft-wrapped head. Heads or transforms the helper does not understand
are errors."""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import gfpo_fast as gf  # noqa: E402
from gfpo_fast.fused_linear import fused_linear_logprobs_ref, fused_linear_policy_loss_ref  # noqa: E402
from gfpo_fast.lm_head import LMHead, config_transform, lm_head_of  # noqa: E402
from gfpo_fast.policy_loss import make_loss_config  # noqa: E402

pytestmark = [
    # the Triton interpreter's numpy ops warn on the -inf lanes the kernels mask on purpose
    pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered"),
    # third-party noise: transformers' deprecation that peft triggers, peft's note on lora_bias without a base bias
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),
]

BACKENDS = ["torch", "cpp"] + (["triton"] if importlib.util.find_spec("triton") else [])
B, T, H, V = 2, 5, 16, 300
CHUNK = 4
TEMPERATURE = 0.8


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def close(actual, expected, *, atol, rtol, what):
    """``torch.testing.assert_close`` whose message starts with what was compared."""
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def grads(outputs, upstream, wrt):
    """Gradients of ``sum(output * upstream)`` to the tensors ``wrt`` (kept graph)."""
    total = sum((o * u).sum() for o, u in zip(outputs, upstream))
    return torch.autograd.grad(total, wrt, retain_graph=True)


# ----------------------------------------------------------------------------- the op against its reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "softcap"), [(0.25, None), (1.0, 1.5), (3.0, 2.0)])
def test_scaled_and_softcapped_logprobs_match_reference(backend, scale, softcap):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 2 / H**0.5).requires_grad_()
    bias = (0.5 * torch.randn(V)).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    up = (torch.randn(B, T), torch.randn(B, T))
    kw = dict(bias=bias, temperature=TEMPERATURE, scale=scale, softcap=softcap, return_entropy=True)
    out = gf.fused_linear_logprobs(hidden, weight, ids, chunk_size=CHUNK, backend=backend, **kw)
    ref = fused_linear_logprobs_ref(hidden, weight, ids, **kw)
    for name, a, e in zip(["logp", "entropy"], out, ref):
        close(a, e, atol=2e-5, rtol=1e-5, what=name)
    for name, a, e in zip(["hidden", "weight", "bias"], grads(out, up, (hidden, weight, bias)),
                          grads(ref, up, (hidden, weight, bias))):
        close(a, e, atol=2e-5, rtol=1e-4, what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcapped_policy_loss_matches_reference(backend):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 2 / H**0.5).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    kw = dict(temperature=TEMPERATURE, scale=0.5, softcap=2.0)
    with torch.no_grad():
        old = fused_linear_logprobs_ref(hidden, weight, ids, **kw) + 0.1 * torch.randn(B, T)
    tensors = (old, torch.randn(B), mask)
    loss, _ = gf.fused_linear_policy_loss(hidden, weight, ids, *tensors, chunk_size=CHUNK, backend=backend,
                                          loss_type="dapo", **kw)
    ref, _ = fused_linear_policy_loss_ref(make_loss_config(loss_type="dapo"), hidden, weight, ids, *tensors, **kw)
    close(loss, ref, atol=1e-6, rtol=1e-5, what="loss")
    for name, a, e in zip(["hidden", "weight"], torch.autograd.grad(loss, (hidden, weight)),
                          torch.autograd.grad(ref, (hidden, weight))):
        close(a, e, atol=1e-6, rtol=1e-4, what=f"d{name}")


@pytest.mark.parametrize(("kw", "match"), [(dict(scale=0.0), "scale must be > 0"),
                                           (dict(scale=float("inf")), "scale must be finite"),
                                           (dict(softcap=-1.0), "softcap must be > 0"),
                                           (dict(softcap="30"), "softcap must be a number")])
def test_bad_transform_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        gf.fused_linear_logprobs(torch.randn(3, H), torch.randn(V, H), torch.zeros(3, dtype=torch.long), **kw)


# ----------------------------------------------------------------------------- tiny models
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)


def tiny_model(config_cls, model_cls, **config):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **config)).float()
    with torch.no_grad():  # logits of a few units, so that the cap and the scale matter
        model.get_output_embeddings().weight.mul_(40)
    return model


def check_against_model_logits(model, params, backend):
    """The op's log-probs (and entropies) with ``lm_head_of(model)`` vs ``log_softmax`` of the model's own
    logits: values and gradients to the last hidden states and ``params``."""
    ids = torch.randint(0, V, (B, T + 1))
    out = model(input_ids=ids, output_hidden_states=True)
    last = out.hidden_states[-1]  # [B, T + 1, H], the input of the model's lm_head
    hidden, targets = last[:, :-1], ids[:, 1:]
    head = lm_head_of(model)
    head.check(last, out.logits)
    fast = gf.fused_linear_logprobs(hidden, token_ids=targets, temperature=TEMPERATURE, chunk_size=CHUNK,
                                    return_entropy=True, backend=backend, **head.op_kwargs())
    logq = torch.log_softmax(out.logits[:, :-1].float() / TEMPERATURE, -1)
    ref = (logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logq.exp() * logq).sum(-1))
    for name, a, e in zip(["logp", "entropy"], fast, ref):
        close(a, e, atol=3e-5, rtol=1e-5, what=name)
    up = (torch.randn(B, T), torch.randn(B, T))
    wrt = (last, *params)
    for i, (a, e) in enumerate(zip(grads(fast, up, wrt), grads(ref, up, wrt))):
        # fp32 rounding of the two paths, relative to the largest gradient (the x40 head makes them large)
        close(a, e, atol=1e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, what=f"gradient {i} (0: hidden)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_softcap(backend):
    model = tiny_model(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=3.0)
    assert config_transform(model.config) == (1.0, 3.0)
    check_against_model_logits(model, [model.lm_head.weight], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_granite_divides_by_logits_scaling(backend):
    model = tiny_model(GraniteConfig, GraniteForCausalLM, logits_scaling=4.0)
    assert config_transform(model.config) == (0.25, None)
    check_against_model_logits(model, [model.lm_head.weight], backend)


def test_cohere_multiplies_by_logit_scale():
    model = tiny_model(CohereConfig, CohereForCausalLM, logit_scale=0.5)
    assert config_transform(model.config) == (0.5, None)
    check_against_model_logits(model, [model.lm_head.weight], "cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embeddings_and_a_bias(backend):
    model = tiny_model(Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tied = lm_head_of(model)
    assert tied.weight is model.model.embed_tokens.weight and tied.bias is None
    check_against_model_logits(model, [model.model.embed_tokens.weight], backend)
    model.lm_head = torch.nn.Linear(32, V, bias=True)  # untied, with a bias
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        model.lm_head.bias.normal_()
    check_against_model_logits(model, [model.lm_head.weight, model.lm_head.bias], backend)


def lora_model(**lora):
    """The Gemma2 model with a peft LoRA on its lm_head (B random, not zero, so that A gets gradients)."""
    peft = pytest.importorskip("peft")
    model = tiny_model(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=3.0,
                       tie_word_embeddings=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False, **lora)
    model = peft.get_peft_model(model, config)
    model.enable_input_require_grads()  # the hidden states get gradients although peft froze the base
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lora_bias", [False, True])
def test_peft_lora_head(backend, lora_bias):
    model = lora_model(lora_bias=lora_bias)
    head = model.get_output_embeddings()
    params = [head.lora_A["default"].weight, head.lora_B["default"].weight]
    if lora_bias:
        params.append(head.lora_B["default"].bias)
    assert not head.base_layer.weight.requires_grad  # peft freezes the base
    check_against_model_logits(model, params, backend)


def test_lora_merged_and_disabled_heads_use_the_base_weight():
    model = lora_model()
    head = model.get_output_embeddings()
    model.merge_adapter()
    assert lm_head_of(model).weight is head.base_layer.weight
    model.unmerge_adapter()
    with model.disable_adapter():
        assert lm_head_of(model).weight is head.base_layer.weight


def test_unknown_heads_and_transforms_are_errors():
    model = tiny_model(Qwen2Config, Qwen2ForCausalLM)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="output layer is a Sequential, not a plain torch.nn.Linear"):
        lm_head_of(model)
    model = tiny_model(Qwen2Config, Qwen2ForCausalLM)
    model.config.logits_scaling = 2.0  # an unknown model type that sets a transform field
    with pytest.raises(ValueError, match="model_type 'qwen2' sets logits_scaling=2.0, a logit transform"):
        lm_head_of(model)
    with pytest.raises(ValueError, match="lora_dropout=0.1 in training"):
        lm_head_of(lora_model(lora_dropout=0.1).train())
    ids = torch.randint(0, V, (1, 4))
    out = model(input_ids=ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="the model's logits differ"):  # a transform the config does not name
        LMHead(model.lm_head.weight, None, 2.0).check(out.hidden_states[-1], out.logits)


def test_module_passes_the_head_transform():
    model = tiny_model(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=3.0)
    head = lm_head_of(model)
    hidden, ids = torch.randn(B, T, 32), torch.randint(0, V, (B, T))
    tensors = (torch.randn(B, T) - 5, torch.randn(B), torch.ones(B, T))
    loss, _ = gf.FusedLinearGRPOLoss(chunk_size=CHUNK, temperature=TEMPERATURE)(
        hidden, head.weight, ids, *tensors, bias=head.bias, scale=head.scale, softcap=head.softcap)
    ref, _ = fused_linear_policy_loss_ref(make_loss_config(), hidden, head.weight, ids, *tensors,
                                          temperature=TEMPERATURE, softcap=3.0)
    close(loss, ref, atol=1e-6, rtol=1e-5, what="loss")
