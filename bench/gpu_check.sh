#!/usr/bin/env bash
# The GPU check of extraction, in one run (about 5 minutes on one large GPU; under 2 here):
#   1. the tests marked `gpu` (tests/test_gpu.py), skipped where there is no CUDA;
#   2. bench/gpu_check.py: images/s of CPU decode + GPU model against GPU decode + GPU model,
#      one and two model replicas, and FAISS build and search on the GPU against the CPU.
# Needs torch, torchvision, pyarrow, numpy, pillow, pyyaml, tqdm and pydantic; not Ray. Where
# pydantic is missing (a bare GPU image), wheels in .whl/ are installed into /tmp/fc7-site:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#       typing-inspection
# Usage, from anywhere:  bash bench/gpu_check.sh [gpu_check.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
export PYTHONUNBUFFERED=1

if ! "$python" -c "import pydantic" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fc7-site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/fc7-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: pydantic is missing and .whl/ holds no wheels (see this script's" \
             "header); the pipeline cannot be imported" >&2
        exit 1
    fi
fi

status=0
echo "== 1. tests marked gpu"
if "$python" -c "import pytest" 2>/dev/null; then
    timeout 240 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs || status=1
else
    echo "pytest is not installed: the gpu tests were not run"
    status=1
fi
echo
echo "== 2. throughput"
timeout 300 "$python" bench/gpu_check.py "$@" || status=1
exit $status
