#!/usr/bin/env bash
# Quick start: install fc7 into .venv (first time only), then embed the 12 bundled photos,
# index them, query the index, train a classifier, and curate them (duplicates, audit, map).
# Usage: bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/fc7 ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    # torch 2.14.1 / torchvision 0.29.1: the pair this project is tested with.
    .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install --quiet -e '.[test,curate]'
fi

weights=imagenet
if ! .venv/bin/python - <<'PY'
from pipeline.errors import WeightsError
from pipeline.model import load_weights
try:
    load_weights("imagenet")
except WeightsError as err:
    raise SystemExit(str(err))
PY
then
    cat >&2 <<'MSG'

#######################################################################################
#  The ImageNet AlexNet weights are not available here (offline, or not in the cache). #
#  Running the example with --weights random: the pipeline runs end to end, but the    #
#  embeddings are NOT meaningful. See the README, "Real ImageNet weights offline".     #
#######################################################################################

MSG
    weights=random
fi

rm -rf out/example
.venv/bin/fc7 extract examples/images --out out/example/embeddings --weights "$weights"
.venv/bin/fc7 index out/example/embeddings --out out/example/index
.venv/bin/fc7 query out/example/index --image examples/images/dalmatian/image_0001.jpg -k 5
.venv/bin/fc7 train out/example/embeddings --out out/example/classifier --test-size 0.34
.venv/bin/fc7 predict out/example/classifier --image examples/images/sunflower/image_0002.jpg
# Curation: duplicates, an audit of the labels (4 folds: 4 photos a class), a 2-D map.
.venv/bin/fc7 duplicates out/example/embeddings --out out/example/duplicates
.venv/bin/fc7 audit out/example/embeddings --out out/example/audit --folds 4
.venv/bin/fc7 map out/example/embeddings --out out/example/map --method pca
