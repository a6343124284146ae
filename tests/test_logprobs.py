"""gf.token_logprobs on the torch reference: parity 1-2 (selective log-softmax, temperature), shapes,
entropy, gradients and bad input. Fast backends are compared with it in tests/backends."""
import pytest
import torch

import gfpo_fast as gf
from gfpo_fast import backends

import bad_token_ids


def make(shape=(3, 5, 37), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, ids


def test_equals_gather_of_log_softmax():
    logits, ids = make()
    out = gf.token_logprobs(logits, ids, backend="torch")
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float32 and out.shape == ids.shape


def test_bf16_logits_give_float32_logprobs_of_the_upcast_logits():
    logits, ids = make(dtype=torch.bfloat16)
    out = gf.token_logprobs(logits, ids, backend="torch")
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_temperature_divides_logits_for_logprobs_and_entropy():
    logits, ids = make()
    lp, ent = gf.token_logprobs(logits, ids, temperature=0.7, return_entropy=True, backend="torch")
    z = logits / 0.7
    logp_all = torch.log_softmax(z, -1)
    torch.testing.assert_close(lp, logp_all.gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1))


def test_flat_input_and_gradient():
    logits, ids = make((11, 29))
    x = logits.clone().requires_grad_()
    lp = gf.token_logprobs(x, ids, backend="torch")
    lp.sum().backward()
    expected = torch.nn.functional.one_hot(ids, 29) - torch.softmax(logits, -1)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("call,match", [
    (lambda x, i: gf.token_logprobs(x, i[:, :4]), "token_ids must have shape"),
    (lambda x, i: gf.token_logprobs(x, i.float()), "int64 or int32"),
    (lambda x, i: gf.token_logprobs(x.long(), i), "dtype"),
    (lambda x, i: gf.token_logprobs(x, i, temperature=0.0), "temperature"),
    (lambda x, i: gf.token_logprobs(x[0, 0], i[0, 0]), "dimensions"),
    (lambda x, i: gf.token_logprobs(x, i, backend="fast"), "backend"),
])
def test_bad_input(call, match):
    logits, ids = make()
    with pytest.raises(ValueError, match=match):
        call(logits, ids)


@pytest.mark.parametrize("op,bad,where", bad_token_ids.CASES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_out_of_range_ids_are_a_value_error(backend, op, bad, where):
    if backend == "cpp" and not backends.cpp_status()[0]:
        pytest.skip("the C++ extension is not built")
    bad_token_ids.check_rejected(backend, torch.device("cpu"), op, bad, where)
