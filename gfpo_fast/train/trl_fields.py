"""TRL's ``GRPOConfig`` field by field: what this trainer does with each one that is not a flag of its own.

A field of TRL's ``GRPOConfig`` (TrainingArguments' fields included) is either a ``TrainConfig`` field of the
same name and meaning, or a row of ``NOT_FLAGS`` below: why it is not a flag, and the value of it that describes
what this trainer does anyway (``NO_VALUE`` when none does). ``parse_args`` looks up every ``--flag`` and YAML
key that ``TrainConfig`` lacks here: the value this trainer matches is accepted (a TRL config that sets it still
runs), any other value is a ``ValueError`` with the reason, and a name in neither place is an unknown field.
``tests/train/test_trl_fields.py`` fails on a field of the installed TRL that is in neither place.
"""
from __future__ import annotations

NO_VALUE = object()  # no value of the field describes this trainer: any value is refused

_DISTRIBUTED = "set by `accelerate launch` and its --config_file (DDP, FSDP2, DeepSpeed), not by a trainer flag"
_TRAINER_EVAL = ("the evals are generations on held-out prompts (--do_eval, --eval_steps, --eval_num_prompts, "
                 "--eval_batch_size), not transformers.Trainer's evaluation loop")
_LOGGING = "metrics.jsonl and the --report_to trackers get every metric of every step"
_SAVING = ("checkpoints are written every --save_steps into output_dir/checkpoints with the optimizer and RNG state, "
           "pruned by --save_total_limit; --push_to_hub uploads the final model once")
_DATALOADER = "prompts are drawn by the trainer's own seeded sampler, not a torch DataLoader"
_VLLM = ("vLLM runs colocated only (--generation_backend vllm: one engine per training process, sized from the "
         "longest prompt plus max_completion_length, no tensor parallelism, no sleep mode)")
_LOSS = "not implemented by the fused loss"

# (reason, {field: the value that describes this trainer, or NO_VALUE})
_TABLE: tuple[tuple[str, dict[str, object]], ...] = (
    ("the optimizer is torch's fused AdamW with its default betas and epsilon (--learning_rate, --weight_decay)",
     {"optim": "adamw_torch_fused", "optim_args": None, "optim_target_modules": None, "adam_beta1": 0.9,
      "adam_beta2": 0.999, "adam_epsilon": 1e-8}),
    ("the run's length is --max_steps optimizer steps; prompts are drawn in a seeded shuffled order (--seed), "
     "every epoch reshuffled",
     {"num_train_epochs": NO_VALUE, "train_sampling_strategy": "random", "data_seed": None,
      "shuffle_dataset": True}),
    ("precision is --dtype for the weights and --bf16 for mixed precision; fp16 mixed precision, TF32 and "
     "separate eval precision are not offered",
     {"fp16": False, "tf32": None, "bf16_full_eval": False, "fp16_full_eval": False}),
    (_DISTRIBUTED,
     {"accelerator_config": None, "parallelism_config": None, "local_rank": -1, "ddp_backend": None,
      "ddp_timeout": 1800, "ddp_find_unused_parameters": None, "ddp_bucket_cap_mb": None,
      "ddp_broadcast_buffers": None, "ddp_static_graph": None, "fsdp": None, "fsdp_config": None, "deepspeed": None,
      "average_tokens_across_devices": True, "ds3_gather_for_generation": True, "use_cpu": False}),
    (_TRAINER_EVAL,
     {"eval_strategy": NO_VALUE, "per_device_eval_batch_size": NO_VALUE, "eval_accumulation_steps": None,
      "eval_delay": 0, "eval_on_start": False, "eval_do_concat_batches": True, "eval_use_gather_object": False,
      "batch_eval_metrics": False, "prediction_loss_only": False, "include_for_metrics": [],
      "metric_for_best_model": None, "greater_is_better": None, "load_best_model_at_end": False,
      "label_names": None, "label_smoothing_factor": 0.0, "do_train": NO_VALUE, "do_predict": False,
      "num_generations_eval": NO_VALUE}),
    (_LOGGING,
     {"logging_strategy": "steps", "logging_first_step": NO_VALUE, "logging_nan_inf_filter": NO_VALUE,
      "log_level": NO_VALUE, "log_level_replica": NO_VALUE, "log_on_each_node": NO_VALUE, "disable_tqdm": NO_VALUE,
      "include_num_input_tokens_seen": NO_VALUE, "skip_memory_metrics": NO_VALUE, "debug": "",
      "trackio_space_id": None, "trackio_bucket_id": None, "trackio_static_space_id": None,
      "log_multimodal": NO_VALUE, "log_unique_prompts": NO_VALUE, "log_completions_hub_repo": None}),
    (_SAVING,
     {"save_strategy": "steps", "save_only_model": False, "save_on_each_node": False, "enable_jit_checkpoint": False,
      "hub_strategy": NO_VALUE, "hub_token": None, "hub_private_repo": None, "hub_always_push": False,
      "hub_revision": None, "restore_callback_states_from_checkpoint": False, "ignore_data_skip": False}),
    (_DATALOADER,
     {"dataloader_drop_last": False, "dataloader_num_workers": 0, "dataloader_pin_memory": NO_VALUE,
      "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
      "dataloader_multiprocessing_context": None, "dataloader_in_order": True, "remove_unused_columns": False,
      "length_column_name": NO_VALUE, "auto_find_batch_size": False, "pad_to_multiple_of": NO_VALUE}),
    ("the model loads with --dtype (and --use_peft's quantization) only: no remote code, no other "
     "from_pretrained keywords, dropout as its config has it, no torch.compile, no Liger config beyond "
     "--use_liger_kernel, activation checkpointing only through --gradient_checkpointing",
     {"model_init_kwargs": None, "trust_remote_code": False, "disable_dropout": False, "torch_compile": False,
      "torch_compile_backend": None, "torch_compile_mode": None, "liger_kernel_config": None, "use_cache": NO_VALUE,
      "activation_checkpointing": None, "activation_checkpointing_kwargs": None,
      "gradient_checkpointing_kwargs": None, "torch_empty_cache_steps": None, "full_determinism": False,
      "neftune_noise_alpha": None, "router_aux_loss_coef": None}),
    ("the lm_head's log-probs are computed in float32 chunks by the fused loss whatever the weights' dtype",
     {"cast_lm_head_to_fp32": NO_VALUE}),
    ("generation is transformers' generate (with the prompt's KV cache shared by its G completions) or vLLM; "
     "continuous batching, paged attention and cache implementations are not offered",
     {"cache_implementation": None, "use_transformers_continuous_batching": False,
      "transformers_continuous_batching_config": None, "use_transformers_paged": False}),
    ("use --generation_backend vllm (or transformers) instead", {"use_vllm": NO_VALUE}),
    (_VLLM,
     {"vllm_mode": NO_VALUE, "vllm_model_impl": "vllm", "vllm_enable_sleep_mode": False,
      "vllm_structured_outputs_regex": None, "vllm_server_base_url": None, "vllm_server_host": NO_VALUE,
      "vllm_server_port": NO_VALUE, "vllm_server_timeout": NO_VALUE, "vllm_group_port": NO_VALUE,
      "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1}),
    (f"{_LOSS}: no entropy bonus (--top_entropy_quantile masks tokens by entropy)",
     {"entropy_coef": 0.0, "use_adaptive_entropy": False, "entropy_coef_min": NO_VALUE,
      "entropy_coef_max": NO_VALUE, "entropy_coef_delta": NO_VALUE, "entropy_target": NO_VALUE}),
    ("single-turn completions only: no tools, no environments",
     {"max_tool_calling_iterations": None}),
)

NOT_FLAGS: dict[str, tuple[str, object]] = {name: (reason, value) for reason, fields in _TABLE
                                            for name, value in fields.items()}


def check_not_flag(name: str, value) -> bool:
    """Whether ``name`` is a TRL field of ``NOT_FLAGS`` given the value this trainer matches (accepted: the caller
    drops it). A ``ValueError`` names the field and the reason for any other value; False for a name TRL's
    ``GRPOConfig`` does not have here (an unknown field)."""
    if name not in NOT_FLAGS:
        return False
    reason, matched = NOT_FLAGS[name]
    if matched is not NO_VALUE and value == matched:
        return True
    accepted = "" if matched is NO_VALUE else f" (only {matched!r}, what this trainer does, is accepted)"
    raise ValueError(f"{name}={value!r}: TRL's GRPOConfig field {name!r} is not supported here: {reason}{accepted}")
