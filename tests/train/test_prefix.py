"""Shared prompts (gfpo_fast/train/prefix.py): the same logits, gradients and generations as row-by-row."""
from __future__ import annotations

import pytest
import torch

import gfpo_fast.train.generation as generation
from gfpo_fast.train.__main__ import completion_logits
from gfpo_fast.train.generation import generate_transformers, left_pad
from gfpo_fast.train.prefix import prompt_cache


@pytest.fixture
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def groups(tokenizer, texts, repeats):
    """Left-padded prompt ids and mask: each text repeated ``repeats[i]`` times, as the trainer lays out groups."""
    prompts = [tokenizer(t)["input_ids"] for t, n in zip(texts, repeats) for _ in range(n)]
    return left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))


def test_prompt_cache_is_none_without_repeated_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, mask = groups(tok, ["3+4=", "a longer prompt"], [1, 1])
    assert prompt_cache(model, ids, mask) is None
    assert prompt_cache(model, ids[:, -1:], mask[:, -1:]) is None  # one column: nothing to share


def test_shared_prompts_give_the_same_logits_and_gradients(model_and_tokenizer):
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    # three groups with different prompt lengths (left padding) and sizes, as after GFPO with adaptive k
    ids, mask = groups(tok, ["What is 3 + 4?", "7-2", "Tom has 5 apples. He eats 2."], [3, 1, 2])
    B, T = ids.shape[0], 7
    c_ids = torch.randint(4, len(tok), (B, T))
    c_mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 1, 6, 7])[:, None]).long()  # right padding
    assert prompt_cache(model, ids, mask) is not None  # the shared path really runs
    weights = torch.randn(B, T, model.config.vocab_size)
    results = []
    for share in (False, True):
        model.zero_grad()
        logits = completion_logits(model, ids, mask, c_ids, c_mask, share_prompts=share)
        assert logits.shape == (B, T, model.config.vocab_size)
        ((logits * weights) * c_mask[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logits.detach() * c_mask[..., None], grads))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_shared_prefill_matches_row_by_row(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    prompts = [tok(t)["input_ids"] for t in ["5+1=", "5+1=", "5+1=", "two plus two", "two plus two"]]
    kwargs = dict(max_new_tokens=8, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, eos_ids=[tok.eos_token_id])
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    assert prompt_cache(model, ids, mask) is not None  # the shared path really runs
    shared = generate_transformers(model, tok, prompts, **kwargs)
    monkeypatch.setattr(generation, "prompt_cache", lambda *args: None)
    plain = generate_transformers(model, tok, prompts, **kwargs)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.completion_mask, plain.completion_mask)
