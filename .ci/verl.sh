#!/usr/bin/env bash
# CI job: gfpo_fast.integrations.verl against verl's own code on this 2-core CPU machine (the fused log-prob
# backend against verl's FusedLinearForPPO, the registered losses against verl's, GFPO on verl's DataProto).
# Builds its own venv (.ci/venv-verl): verl is installed without its dependencies (its full install pulls
# ray[default], wandb, datasets, hydra, ...), with only the packages `import verl.trainer.ppo.core_algos` and the
# tested modules need. `bash .ci/verl.sh --setup-only` stops after the install. Installs follow
# constraints/verl.txt, the set this job last passed with; `--unlocked` (for .ci/upgrade_constraints.sh)
# resolves today's releases instead, pinning only torch and verl, and leaves the set it tested in $VENV/freeze.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.ci/venv-verl
VERL_VERSION=0.9.1     # the release gfpo_fast.integrations.verl is tested with (its verl extra's range)
TORCH_VERSION=2.13.0   # the main set's torch; pip takes the +cpu build from this machine's disk
# What `import verl` and the tested modules need when verl comes without its dependencies: its core
# (packaging ... codetiming, and transformers in verl's own range), then what verl.trainer.ppo.ray_trainer imports
# (torchdata, cachetools, fastapi, uvicorn), for the GFPO step the integration puts into verl's PPO trainer.
VERL_LIGHT_DEPS=(packaging numpy omegaconf "tensordict<=0.10.0" ray codetiming "transformers>=5.5.3,!=5.6.0,<5.11"
                 torchdata cachetools fastapi uvicorn)

mode="${1:-}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
if [[ "$mode" == "--unlocked" ]]; then
  # Without the torch pin an unpinned dependency would resolve a multi-GB CUDA torch.
  printf 'torch==%s\nverl==%s\n' "$TORCH_VERSION" "$VERL_VERSION" >"$VENV/constraints.txt"
  export PIP_CONSTRAINT="$VENV/constraints.txt"
else
  export PIP_CONSTRAINT=constraints/verl.txt  # reaches pip's isolated build environment too
fi
python -m pip install -q -U "$(grep '^pip==' "$PIP_CONSTRAINT" || echo pip)"
python -m pip install -q "torch==$TORCH_VERSION"
python -m pip install -q --no-deps "verl==$VERL_VERSION"
python -m pip install -q pybind11 "${VERL_LIGHT_DEPS[@]}" -e ".[train,test]"
if [[ "$mode" == "--unlocked" ]]; then
  python -m pip freeze --all --exclude-editable >"$VENV/freeze.txt"
fi
python -c "import torch, verl, transformers; print('torch', torch.__version__, '| verl', verl.__version__, '| transformers', transformers.__version__)"

if [[ "$mode" == "--setup-only" ]]; then
    exit 0
fi
python -m pytest tests/integrations/test_verl.py -v -p no:cacheprovider
