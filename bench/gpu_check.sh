#!/usr/bin/env bash
# The GPU check of this trainer: one command, at most 8 minutes on one GPU, no network.
#
#   bench/gpu_check.sh prepare            # HERE (a machine with PyPI): fill .whl/ with the
#                                         # wheels the GPU machine lacks (deepspeed & its deps)
#   bench/gpu_check.sh [run] [OPTIONS]    # THERE (the GPU machine): install .whl/ if deepspeed
#                                         # is missing, then python bench/gpu_check.py OPTIONS
#   bench/gpu_check.sh --cpu-plumbing     # anywhere: the same steps on the CPU, small shapes,
#                                         # every figure marked "not a GPU figure"
#
# Results: one line per check ("gpu_check: <name>: PASS|FAIL ...") and gpu_check.json in $OUT
# if set, else runs/gpu_check/. Exit status 0 = every check passed, 1 = a check failed,
# 2 = the environment was refused (no CUDA, no deepspeed): nothing falls back to the CPU.
# bench/README.md ("gpu_check") says what each line means.
#
# Environment: PYTHON (default .venv/bin/python if it exists, else python3); WHEEL_TARGET
# (where the wheels are installed, default /tmp/site; it is put first on PYTHONPATH).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

WHEEL_DIR=.whl
WHEEL_TARGET=${WHEEL_TARGET:-/tmp/site}

# What the GPU machine (an image with torch 2.11, transformers 5.17, ...; see
# /work/.library/device/KINDS.md) lacks for this project: deepspeed and its pure-Python
# dependencies not in that image. Pinned to what constraints.txt pins here. datasets is not
# needed: the embedded task never imports it (alsace_ds/data/hub.py imports it lazily, for the
# Hub tasks only). typing-extensions is in the image, but pydantic 2.14 needs a recent one.
DEEPSPEED_VERSION=0.19.8
PURE_WHEELS=(hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0)
BINARY_WHEELS=(pydantic-core==2.50.5) # compiled: fetched for CPython 3.12, manylinux x86-64

die() {
  echo "gpu_check: $*" >&2
  exit 2
}

default_python() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x .venv/bin/python ]]; then
    echo .venv/bin/python
  else
    echo python3
  fi
}

prepare() {
  local py
  py=$(default_python)
  # .whl/ must not be committed, and .gitignore is not ours to edit: ignore it in this
  # checkout only (the device tool carries ignored folders when named in `carry`).
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  rm -rf "$WHEEL_DIR"
  mkdir -p "$WHEEL_DIR"
  # deepspeed as a pure-Python wheel (no compiled ops: they are JIT-built on first use, and
  # this trainer uses none of them with torch's AdamW). --no-build-isolation: its setup.py
  # imports torch, which the venv has (an isolated build would download torch).
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEEL_DIR" \
    "deepspeed==$DEEPSPEED_VERSION"
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$WHEEL_DIR" "${PURE_WHEELS[@]}"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEEL_DIR" "${BINARY_WHEELS[@]}"
  local w
  for w in "$WHEEL_DIR"/deepspeed-*.whl; do
    case $w in *-py3-none-any.whl) ;; *) die "prepare: $w is not a pure-Python wheel" ;; esac
  done
  # One version of each package, or the install there stops (pip refuses duplicates).
  local wheels=("$WHEEL_DIR"/*.whl) names=() dup
  for w in "${wheels[@]}"; do
    w=${w##*/}
    names+=("${w%%-*}")
  done
  dup=$(printf '%s\n' "${names[@]}" | tr 'A-Z-' 'a-z_' | sort | uniq -d)
  [[ -z $dup ]] || die "prepare: more than one wheel of: $dup"
  ls -l "$WHEEL_DIR"
  echo "gpu_check: prepare: ${#wheels[@]} wheels, $(du -sh "$WHEEL_DIR" | cut -f1)" \
    "in $WHEEL_DIR (carry it: run(carry=[\".whl\"], command=\"bench/gpu_check.sh\"))"
}

ensure_deepspeed() {
  local py=$1
  if "$py" -c 'import deepspeed' >/dev/null 2>&1; then
    return 0
  fi
  # Installed by an earlier call on this machine?
  if [[ -d $WHEEL_TARGET/deepspeed ]]; then
    export PYTHONPATH="$WHEEL_TARGET${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c 'import deepspeed' >/dev/null 2>&1 && return 0
  fi
  compgen -G "$WHEEL_DIR/*.whl" >/dev/null ||
    die "environment: FAIL deepspeed is not importable by $py and $WHEEL_DIR/ holds no" \
      "wheels: run 'bench/gpu_check.sh prepare' on a machine with PyPI and carry $WHEEL_DIR"
  local wheels=("$WHEEL_DIR"/*.whl)
  echo "gpu_check: installing ${#wheels[@]} wheels from $WHEEL_DIR into $WHEEL_TARGET"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WHEEL_TARGET" "$WHEEL_DIR"/*.whl
  export PYTHONPATH="$WHEEL_TARGET${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c 'import deepspeed' ||
    die "environment: FAIL deepspeed still does not import after installing $WHEEL_DIR"
}

run() {
  local py
  py=$(default_python)
  command -v "$py" >/dev/null 2>&1 || die "environment: FAIL no python at '$py'"
  ensure_deepspeed "$py"
  export PYTHONUNBUFFERED=1
  exec "$py" bench/gpu_check.py "$@"
}

case "${1:-run}" in
prepare)
  shift
  prepare "$@"
  ;;
run)
  [[ $# -gt 0 ]] && shift
  run "$@"
  ;;
-h | --help)
  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  ;;
*)
  run "$@"
  ;;
esac
