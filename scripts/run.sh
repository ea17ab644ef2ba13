#!/usr/bin/env bash
# The project's main job (the README's first command): install, then train the same tiny BERT
# (masked-LM on the built-in BBC News corpus, dropout on) with the same seed on the plain
# `reference` path and the fused `cpu` path, and print the comparison table (per-step loss
# difference, final metric, tokens/s, step time, peak memory; JSON and plot under runs/).
#   FUSEDFORMER_SKIP_INSTALL=1 bash scripts/run.sh     # reuse what is installed
#   bash scripts/run.sh --steps 50                     # arguments go to `fusedformer-train compare`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${FUSEDFORMER_SKIP_INSTALL:-0}" != "1" ]; then
  $PY -m pip install -q "setuptools>=70.1" wheel ninja   # the no-isolation build's own tools
  $PY -m pip install -q torch                      # first: the extension is built against it
  $PY -m pip install -q --no-build-isolation -e ".[hf,data,bench]"
fi
# PYTHONSAFEPATH: keep the repository root off sys.path (python >= 3.11), or its kernels/ folder
# shadows Hugging Face's `kernels` package, which transformers imports when it is installed
export PYTHONSAFEPATH=1
exec $PY -m fusedformer.train compare "$@"
