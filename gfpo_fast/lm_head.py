"""A causal LM's output layer as the fused-linear ops take it: ``(weight, bias, scale, softcap)``.

:func:`lm_head_of` reads a model (a transformers causal LM, possibly wrapped by peft) and returns an
:class:`LMHead` such that the model's logits are ``head_transform_ref(hidden @ weight.T + bias, scale, softcap)``:

* the output layer (``model.get_output_embeddings()``): a plain ``torch.nn.Linear`` (tied to the input
  embeddings or not: its weight is then the embedding parameter itself, and gradients reach it), or a peft
  LoRA ``Linear`` over one, whose active adapters are merged on every call into the effective weight
  ``W + sum_a scaling_a * B_a @ A_a`` (and bias ``b + sum_a scaling_a * b_B_a`` with ``lora_bias``), a
  differentiable ``[V, H]`` tensor, so the loss's weight gradient reaches every ``A_a`` and ``B_a``; the
  adapters' product is cast to the base weight's dtype before the sum (peft's own forward adds the two outputs
  instead: the same value up to that rounding). An FSDP2-sharded (DTensor) weight is passed on as it is (the
  fused-linear ops gather it), or gathered here before a LoRA merge;
* the logit transform of the model's text config, by ``model_type`` (:data:`HEAD_TRANSFORMS`, read from
  transformers' modelling code): final-logit soft-capping (``final_logit_softcapping``: Gemma 2/3/3n/4,
  VaultGemma, nanochat, Beam), a multiplied scale (``logit_scale``: Cohere; ``logits_scaling``: HyperCLOVA X;
  ``lm_head_multiplier``: Falcon-H1) or a divided one (``logits_scaling``: Granite, whose ``scale`` is
  ``1 / logits_scaling``). Transformers applies the scale, then the cap; the sampling temperature divides the
  result (TRL), which is the order of :func:`gfpo_fast.fused_linear.fused_linear_logprobs`.

Anything else is a ``ValueError`` naming what was not understood, never a silently different objective: another
output-layer type (quantized, DoRA or another LoRA variant, a LoRA with active dropout, whose output is not a
merged weight's), or a config of an unlisted ``model_type`` that sets one of the transform fields
(:data:`TRANSFORM_FIELDS`; the same field name means a division in Granite and a product in HyperCLOVA X). A
model that transforms its logits without such a field is caught by :meth:`LMHead.check`, which compares the
model's own logits with the head's on one batch.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .fused_linear import gather_full, head_transform_ref

# Text-config fields with which transformers models transform the logits after the lm_head.
TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier")
_CAP = ("softcap", "final_logit_softcapping")
# model_type -> (what the field does, field): the logit transforms of transformers' causal LMs (modeling_*.py).
HEAD_TRANSFORMS = {
    **{t: (_CAP,) for t in ("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat",
                            "beam")},
    **{t: (("multiply", "logit_scale"),) for t in ("cohere", "cohere2", "cohere2_moe")},
    **{t: (("divide", "logits_scaling"),) for t in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid",
                                                    "granite_swa", "granitemoe_swa")},
    "hyperclovax": (("multiply", "logits_scaling"),),
    "falcon_h1": (("multiply", "lm_head_multiplier"),),
}


@dataclasses.dataclass(frozen=True)
class LMHead:
    """The output layer of a model: logits ``= head_transform_ref(hidden @ weight.T + bias, scale, softcap)``.

    ``weight`` ``[V, H]`` (the effective one: LoRA merged, differentiable), ``bias`` ``[V]`` or None, in the
    model's dtype; ``scale`` a positive float (1: none); ``softcap`` a positive float or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def op_kwargs(self) -> dict:
        """``weight``, ``bias``, ``scale`` and ``softcap`` as keywords of the fused-linear ops."""
        return dict(weight=self.weight, bias=self.bias, scale=self.scale, softcap=self.softcap)

    def op_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(hidden, op keywords)`` in the dtype the model's own lm_head would compute in: the autocast dtype when
        autocast is on for ``hidden``'s device (the projection of an autocast forward), else the weight's. Casting
        outside the op keeps its forward and its recomputing backward in one dtype (autograd Functions run their
        backward without autocast)."""
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        cast = dataclasses.replace(self, weight=self.weight.to(dtype),
                                   bias=None if self.bias is None else self.bias.to(dtype))
        return hidden.to(dtype), cast.op_kwargs()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from its last hidden states ``[..., H]``, float32 ``[..., V]`` (the reference)."""
        return head_transform_ref(F.linear(hidden, gather_full(self.weight), gather_full(self.bias)), self.scale,
                                  self.softcap)

    def check(self, hidden: torch.Tensor, logits: torch.Tensor, rtol: float = 1e-2) -> None:
        """Raises ``ValueError`` if the model's ``logits`` ``[..., V]`` are not :meth:`logits` of its last
        ``hidden`` states ``[..., H]`` (the same positions) within ``rtol`` of their largest magnitude, i.e. the
        model transforms its logits in a way this head does not know. One host read."""
        with torch.no_grad():
            expected = self.logits(hidden)
            error, largest = torch.stack([(logits.float() - expected).abs().max(), expected.abs().max()]).tolist()
            bound = rtol * largest
        if not error <= bound:
            raise ValueError(
                f"the model's logits differ from its lm_head's ({self.describe()}) applied to its last hidden states "
                f"by up to {error:.3g} (allowed {bound:.3g}): the model transforms its logits in a way gfpo-fast's "
                "fused-linear path does not reproduce"
            )

    def describe(self) -> str:
        return (f"weight {tuple(self.weight.shape)}, bias {'yes' if self.bias is not None else 'no'}, "
                f"scale {self.scale}, softcap {self.softcap}")


def lm_head_of(model: torch.nn.Module) -> LMHead:
    """The :class:`LMHead` of ``model``: its output layer (``get_output_embeddings()``) and the logit transform
    of ``model.config`` (its text config). Call it on every step (a LoRA head is merged per call, with
    gradients). Raises ``ValueError`` for an output layer or a config transform it does not understand."""
    config = model.config.get_text_config()
    scale, softcap = config_transform(config)
    head = model.get_output_embeddings()
    weight, bias = _layer_weight(head)
    return LMHead(weight, bias, scale, softcap)


def config_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` of a transformers text config (see the module docstring)."""
    model_type = getattr(config, "model_type", None)
    rules = HEAD_TRANSFORMS.get(model_type)
    if rules is None:
        unknown = [f"{name}={getattr(config, name)}" for name in TRANSFORM_FIELDS
                   if getattr(config, name, None) not in (None, 1)]
        if unknown:
            raise ValueError(f"model_type {model_type!r} sets {', '.join(unknown)}, a logit transform "
                             "gfpo_fast.lm_head does not know for this model type "
                             f"(known: {', '.join(sorted(HEAD_TRANSFORMS))})")
        return 1.0, None
    scale, softcap = 1.0, None
    for kind, field in rules:
        value = getattr(config, field)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{model_type} config field {field} must be a positive number or None, got {value!r}")
        if kind == "softcap":
            softcap = float(value)
        elif kind == "multiply":
            scale *= float(value)
        else:
            scale /= float(value)
    return scale, softcap


def _layer_weight(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of an output layer: a ``torch.nn.Linear`` or a peft LoRA ``Linear`` over one."""
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    lora = _peft_lora_linear()
    if lora is None or not isinstance(head, lora) or type(head.base_layer) is not torch.nn.Linear:
        raise ValueError(
            f"the model's output layer is a {type(head).__name__}, not a plain torch.nn.Linear (tied or not) or a "
            "peft LoRA Linear over one, the heads gfpo_fast.lm_head understands"
        )
    return _merged_lora(head)


def _peft_lora_linear():
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # without peft no output layer is a LoRA one
        return None
    return Linear


def _merged_lora(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective ``(weight, bias)`` of a peft LoRA ``Linear``: its active adapters merged (differentiable)."""
    base = head.base_layer
    if head.disable_adapters or head.merged:
        if head.disable_adapters and head.merged:
            raise ValueError("the LoRA lm_head has merged adapters but adapters are disabled (peft unmerges them in "
                             "its forward); unmerge them first")
        return base.weight, base.bias  # merged: the adapters are in the base weight; disabled: only the base
    if head.fan_in_fan_out:
        raise ValueError("the LoRA lm_head has fan_in_fan_out=True, which a torch.nn.Linear base never has")
    weight, bias = gather_full(base.weight), gather_full(base.bias)
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue  # peft skips it too
        if name in head.lora_variant:
            raise ValueError(f"LoRA adapter {name!r} of the lm_head is a {type(head.lora_variant[name]).__name__} "
                             "variant (DoRA, aLoRA, ...), whose output is not a merged weight's; use plain LoRA")
        dropout = head.lora_dropout[name]
        if head.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            raise ValueError(f"LoRA adapter {name!r} of the lm_head has lora_dropout={dropout.p} in training, which "
                             "is not a merged weight; set lora_dropout=0 for the lm_head")
        A, B = gather_full(head.lora_A[name].weight), gather_full(head.lora_B[name].weight)
        s = head.scaling[name]
        weight = weight + (s * (B @ A)).to(weight.dtype)  # [V, r] @ [r, H]
        b_bias = gather_full(head.lora_B[name].bias)
        if b_bias is not None:
            b_bias = (s * b_bias).to(weight.dtype)
            bias = b_bias if bias is None else bias + b_bias
    return weight, bias
