#!/usr/bin/env bash
# The GPU check of extraction, in one run (about 5 minutes on one large GPU; under 2 here):
#   1. the tests marked `gpu` (tests/test_gpu.py), skipped where there is no CUDA; without
#      pytest, the same checks run directly (bench/gpu_check.py --checks);
#   2. bench/gpu_check.py: images/s of CPU decode + GPU model against GPU decode + GPU model,
#      one and two model replicas, and FAISS build and search on the GPU against the CPU.
# Needs torch and torchvision; not Ray. What else is missing (pytest, pydantic, Pillow, PyYAML,
# pyarrow, tqdm, faiss) is named and its part skipped or done without it. Where pydantic is
# missing and .whl/ holds wheels, they are installed into /tmp/fc7-site first (nothing is
# downloaded there):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#       typing-inspection
# Usage, from anywhere:  bash bench/gpu_check.sh [gpu_check.py options]
# Exit status: 0 when every part that could run passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
export PYTHONUNBUFFERED=1

if ! "$python" -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch and torchvision; nothing to check" >&2
    exit 1
fi
if ! "$python" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fc7-site \
        .whl/*.whl && export PYTHONPATH="/tmp/fc7-site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$python" - <<'PY'
import importlib.util
names = {"pytest": "pytest", "pydantic": "pydantic", "PIL": "Pillow", "yaml": "PyYAML",
         "pyarrow": "pyarrow", "tqdm": "tqdm", "faiss": "faiss"}
print(" ".join(n for m, n in names.items() if importlib.util.find_spec(m) is None))
PY
)
"$python" -c "import torch; print('CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
echo "missing: ${missing:-nothing}"

status=0
echo
echo "== 1. tests marked gpu"
if [[ " $missing " == *" pytest "* ]]; then
    echo "pytest is not installed: running the checks directly"
    timeout 180 "$python" bench/gpu_check.py --checks || status=1
elif [[ " $missing " =~ " "(pydantic|Pillow|PyYAML|pyarrow)" " ]]; then
    echo "skipped: the tests import the pipeline, which needs what is missing above"
    status=1
else
    timeout 180 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs || status=1
fi
echo
echo "== 2. throughput"
timeout 270 "$python" bench/gpu_check.py "$@" || status=1
echo
echo "gpu_check: exit status $status"
exit $status
