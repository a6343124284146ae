"""Sampling completions: transformers ``generate`` (default) or an in-process vLLM engine (colocate).

Both take prompt token ids (the chat template is applied once, in the trainer, so no BOS is doubled)
and return a :class:`Rollout` of right-padded completions. A completion ends at the first token of
the EOS set (the generation config's ``eos_token_id`` entries plus the tokenizer's EOS); that token is
kept and everything after it is masked. A completion with no EOS hit ``max_completion_length`` and is
*truncated*.

The transformers path samples from the global torch RNG, which the trainer seeds differently on every
rank (``seed + process_index``) so that the copies of a prompt on different ranks differ.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from .prefix import cache_name, prompt_cache


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_completion_length
    sampling_logp: torch.Tensor | None = None  # (B, T) vLLM's log-probs of the sampled tokens (colocate only)

    def completion_lists(self) -> list[list[int]]:
        """Unpadded completion ids per row (a host sync)."""
        lengths = self.completion_mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The EOS set: generation config ``eos_token_id`` (int or list) plus the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = set([] if ids is None else [ids] if isinstance(ids, int) else ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token (neither generation_config.eos_token_id nor tokenizer.eos_token); "
                         "set one so that completions can end")
    return sorted(ids)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``(ids (B, P), mask (B, P))`` padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def completion_masks(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask (B, T), truncated (B,))``: mask is 1 up to and including the first EOS of each row."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (B, T)
    has_eos = is_eos.any(1)
    T = completion_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), T)  # (B,) index of the first EOS, T if none
    mask = (torch.arange(T, device=completion_ids.device)[None] <= first[:, None]).long()
    return mask, ~has_eos


def _trim(rollout_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the right-hand columns that are padding in every row (a host sync)."""
    width = max(int(mask.sum(1).max()), 1)
    ids = rollout_ids[:, :width].masked_fill(mask[:, :width] == 0, pad_id)
    return ids, mask[:, :width]


@torch.no_grad()
def generate_transformers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool,
                          temperature: float, top_p: float, top_k: int, eos_ids: list[int]) -> Rollout:
    """Samples one completion per prompt id list with ``model.generate`` (no ``num_return_sequences``:
    the caller repeats each prompt ``G`` times; repeated prompts are prefilled once, ``prefix.prompt_cache``)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()  # also keeps gradient checkpointing (train-mode only) out of the KV-cached decode
    try:
        cache = prompt_cache(model, prompt_ids, prompt_mask)  # None when every prompt is distinct (evals)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **{cache_name(model): cache},
                             max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, disable_compile=True, **sampling)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1]:]  # (B, T)
    mask, truncated = completion_masks(completion_ids, eos_ids)
    completion_ids, mask = _trim(completion_ids, mask, tokenizer.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated)


class VLLMColocate:
    """An in-process vLLM engine per rank (``external_launcher``), fed with the trainer's weights.

    Weights are pushed parameter by parameter through the model's own vLLM loader after every optimizer
    step (lazily, before the next generation), followed by a prefix-cache reset; the engine's sampled-token
    log-probs (``processed_logprobs``: after temperature) come back for the importance-sampling correction.
    Plain DDP only: under FSDP/ZeRO-3 the parameters would have to be gathered first (not implemented).
    Written from ``vllm_accelerate.md`` (TRL's colocate design); not yet run against a real vLLM install.
    The engine loads the initial weights from disk; the first generation pushes the trainer's weights
    (so a resumed run generates from the resumed policy).
    """

    def __init__(self, model_path: str, *, seed: int, process_index: int, max_model_len: int, max_num_seqs: int,
                 gpu_memory_utilization: float):
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("generation_backend='vllm' needs vLLM: `pip install vllm` (on a CUDA machine), "
                             "or use generation_backend='transformers'")
        from vllm import LLM

        self.llm = LLM(model=model_path, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, seed=seed + process_index, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True, max_num_batched_tokens=4096)
        self.synced_step = -1

    def sync_weights(self, model, step: int) -> None:
        if step == self.synced_step:
            return
        worker = self.llm.llm_engine.model_executor.driver_worker  # in-process: external_launcher
        worker_model = getattr(worker, "worker", worker).model_runner.model  # the wrapper's name varies by version
        for name, param in model.named_parameters():
            worker_model.load_weights([(name, param.data)])
        self.llm.reset_prefix_cache()  # KV cached from the old weights is stale
        self.synced_step = step

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: float, top_k: int, eos_ids: list[int], pad_id: int, device) -> Rollout:
        from vllm import SamplingParams

        params = SamplingParams(n=1, max_tokens=max_new_tokens, logprobs=0, stop_token_ids=eos_ids,
                                temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0, top_k=top_k if do_sample and top_k > 0 else -1)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outputs]
        logps = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outputs]
        T = max(max(len(s) for s in seqs), 1)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        sampling_logp = torch.zeros((len(seqs), T))
        for i, (s, lp) in enumerate(zip(seqs, logps)):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            sampling_logp[i, :len(lp)] = torch.tensor(lp)
        ids = ids.to(device)
        mask, truncated = completion_masks(ids, eos_ids)
        mask = mask * (torch.arange(T, device=device)[None] < torch.tensor([len(s) for s in seqs], device=device)[:, None])
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
        return Rollout(prompt_ids, prompt_mask, ids, mask.long(), truncated, sampling_logp.to(device))
