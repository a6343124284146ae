"""Shared prompts (gfpo_fast/train/prefix.py): the same hidden states, gradients and generations as row-by-row,
with and without gradient checkpointing."""
from __future__ import annotations

import pytest
import torch

import gfpo_fast.train.generation as generation
from gfpo_fast.train.generation import generate_transformers, left_pad
from gfpo_fast.train.loop import completion_hidden
from gfpo_fast.train.prefix import allow_checkpointed_prefix, prompt_cache


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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_same_hidden_states_and_gradients(model_and_tokenizer, checkpointing):
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    # three groups with different prompt lengths (left padding) and sizes, as after GFPO with adaptive k
    ids, mask = groups(tok, ["What is 3 + 4?", "7-2", "Tom has 5 apples. He eats 2."], [3, 1, 2])
    B, T = ids.shape[0], 7
    c_ids = torch.randint(4, len(tok), (B, T))
    c_mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 1, 6, 7])[:, None]).long()  # right padding
    assert prompt_cache(model, ids, mask) is not None  # the shared path really runs
    weights = torch.randn(B, T, model.config.hidden_size)
    results = []
    for share in (False, True):
        if share and checkpointing:  # the trainer's setup for sharing under checkpointing
            model.gradient_checkpointing_enable()
            allow_checkpointed_prefix(model)
        model.train().zero_grad()
        hidden = completion_hidden(model, ids, mask, c_ids, c_mask, share_prompts=share)
        assert hidden.shape == (B, T, model.config.hidden_size)
        ((hidden * weights) * c_mask[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}  # all but lm_head
        results.append((hidden.detach() * c_mask[..., None], grads))
    (plain, plain_grads), (shared, shared_grads) = results
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters())) - 1
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointed_layers_replay_in_the_shared_forward(model_and_tokenizer):
    """Under checkpointing the continuation's layers are replayed in the backward (so checkpointing is really on)
    and the prompt pass is not (it writes the cache)."""
    model, tok = model_and_tokenizer
    model.gradient_checkpointing_enable()
    allow_checkpointed_prefix(model)
    model.train()
    calls = []
    layer = model.model.layers[0].mlp  # inside the checkpointed forward (a replay skips the layer's own hooks)
    layer.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    ids, mask = groups(tok, ["What is 3 + 4?"], [3])
    c_ids, c_mask = torch.randint(4, len(tok), (3, 5)), torch.ones(3, 5, dtype=torch.long)
    completion_hidden(model, ids, mask, c_ids, c_mask, share_prompts=True).sum().backward()
    P = ids.shape[1]
    # prompt pass (P - 1 positions, once), continuation forward (5), its replay in the backward (5)
    assert calls == [P - 1, 5, 5]


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
