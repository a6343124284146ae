"""LoRA and QLoRA through peft: the adapter on the policy, its reference, its weights for vLLM, its export.

With ``use_peft`` the policy is the loaded model wrapped by ``peft.get_peft_model`` (``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``: TRL's ``ModelConfig`` fields and defaults; None targets peft's default
modules for the architecture), or, on resume, the checkpoint's adapter loaded trainable onto the base model. Only
the adapter's weights train. The loss reads the output layer through :func:`gfpo_fast.lm_head.lm_head_of`, which
merges a LoRA'd lm_head per step (with gradients to its adapter), so the fused-linear loss runs through any LoRA
model; the other layers run peft's own forward. The reference policy (``beta != 0``) is the base model: the same
module with its adapters disabled (:func:`adapters_disabled`, TRL's rule), so no second copy is loaded.
Checkpoints hold the adapter (peft's ``save_pretrained``), and ``save_merged_model`` writes the base model with the
adapter merged, loadable by transformers without peft. vLLM gets merged full weights under the base model's
names (:func:`merged_named_weights`), computed per layer without changing the policy.

QLoRA (``load_in_4bit`` / ``load_in_8bit``) loads the base weights through bitsandbytes, which needs CUDA.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch


def require_peft() -> None:
    """``ValueError`` unless peft is importable (``use_peft``)."""
    if importlib.util.find_spec("peft") is None:
        raise ValueError("use_peft=True needs peft: `pip install peft` (or `pip install 'gfpo-fast[train,peft]'`)")


def quantization_config(cfg):
    """The bitsandbytes config of ``load_in_4bit`` / ``load_in_8bit``, or None; a ``ValueError`` where they cannot
    run (without CUDA or bitsandbytes, or without ``use_peft``: quantized weights do not train)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    flag = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise ValueError(f"{flag}=True needs CUDA: bitsandbytes quantizes on the GPU; on the CPU train LoRA on "
                         "unquantized weights (use_peft=True without it)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag}=True needs bitsandbytes: `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def add_adapter(model, cfg, adapter_dir: Path | None = None):
    """``model`` with a trainable LoRA adapter: a new one from ``cfg``'s ``lora_*`` fields, or the one saved in
    ``adapter_dir`` (a checkpoint's ``model/``). Quantized base weights are prepared for training first."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_peft_model(model) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapters_disabled(model):
    """A context in which a peft ``model`` runs as its base model (its reference policy); a no-op for others."""
    return model.disable_adapter() if is_peft_model(model) else nullcontext()


def merged_named_weights(model) -> Iterator[tuple[str, torch.nn.Parameter | torch.Tensor]]:
    """``(name, tensor)`` of a peft model's base parameters under the base model's own names, each LoRA layer's
    weight with its active adapters' ``scaling * B @ A`` added (a new tensor; the policy is unchanged), the
    adapters' own parameters left out. For any other model, its ``named_parameters()``."""
    if not is_peft_model(model):
        yield from model.named_parameters()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    modules = dict(base.named_modules())
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if not owner:
            yield name, param
            continue
        layer = modules[owner]
        tensor = param.detach()
        if leaf == "weight" and isinstance(layer, LoraLayer) and not layer.merged and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def save_merged(model, tokenizer, path: Path) -> Path:
    """Writes the base model with the adapter merged (transformers' ``save_pretrained``, no peft needed to load it)
    and the tokenizer to ``path``. Merges into the live base weights and removes the adapter: call it last."""
    merged = model.merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
