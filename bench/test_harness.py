"""The harness's correctness check: element by element, with the rules of the kernel tests."""
import torch

from bench.harness import Case, Impl, check, exact_outputs, oracle


def test_fp32_check_sees_an_error_in_a_small_entry():
    """A gradient whose entries under 1e-2 of its largest are wrong by 0.5 % of themselves disagrees, though its
    error is under 1e-4 of its largest entry (the former rule); summation-order noise (fp32 epsilons) agrees."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(1000, generator=g, dtype=torch.float64) * torch.logspace(-6, 0, 1000, dtype=torch.float64)
    e = e.float()
    noisy = e * (1 + 4 * torch.finfo(torch.float32).eps * torch.randn(1000, generator=g))
    assert check((noisy,), (e,))[0]
    small = e.abs() < 1e-2 * e.abs().max()
    wrong = torch.where(small, e * 1.005, e)
    ok, err = check((wrong,), (e,))
    assert not ok and err < 1e-4
    keep = torch.tensor([True, False, True])  # boolean outputs (gfpo_filter's mask) compare too
    assert check((keep,), (keep,))[0] and not check((~keep,), (keep,))[0]


def test_low_precision_check_is_three_way():
    """bf16: agrees within twice the bf16 oracle's own error against the fp32 oracle, disagrees beyond."""
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(4096, generator=g).to(torch.bfloat16).requires_grad_(), "ids": torch.arange(3)}

    def softmax(x):
        return (torch.softmax(x["x"] * 3, -1),)

    case = Case("f", "g", "n", 1, {}, lambda: inputs, [oracle("softmax", softmax)], low_precision=True)
    ref = softmax(inputs)
    exact = exact_outputs(case, inputs)
    assert exact[0].dtype == torch.float32 and ref[0].dtype == torch.bfloat16
    bf16_err = (ref[0].float() - exact[0]).abs().max()
    assert bf16_err > 0
    assert check((exact[0] + 1.9 * bf16_err,), ref, exact)[0]
    assert not check((exact[0] + 2.5 * bf16_err,), ref, exact)[0]
    assert exact_outputs(Case("f", "g", "n", 1, {}, dict, [Impl("fp32")]), {"x": torch.ones(2)}) is None
