#!/usr/bin/env bash
# GFPO with gfpo-fast's fused log-probs and TRL's DAPO loss in verl's PPO trainer (verl >=0.9.1,<0.10, on GPUs:
# verl's FSDP engine is registered for CUDA and NPU only). The overrides are examples/verl/gfpo_fast.yaml's.
# Usage: bash examples/verl/run_gfpo.sh MODEL TRAIN.parquet VAL.parquet [more verl overrides]
#   pip install 'gfpo-fast[verl]'   (gfpo-fast must be importable by every Ray worker)
set -euo pipefail
model="$1" train="$2" val="$3"
shift 3
python -m verl.trainer.main_ppo \
  data.train_files="$train" data.val_files="$val" data.train_batch_size=64 \
  actor_rollout_ref.model.path="$model" \
  actor_rollout_ref.model.external_lib=gfpo_fast.integrations.verl \
  actor_rollout_ref.model.use_fused_kernels=True \
  actor_rollout_ref.model.fused_kernel_options.impl_backend=gfpo_fast \
  actor_rollout_ref.actor.policy_loss.loss_mode=gfpo_fast_dapo \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.rollout.n=8 \
  algorithm.adv_estimator=gfpo_fast_gfpo \
  +algorithm.gfpo.num_remains_in_group=4 \
  +algorithm.gfpo.group_filter=length \
  "$@"
