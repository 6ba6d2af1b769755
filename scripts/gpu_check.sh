#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, prepared to run on a fresh GPU machine within
# 8 minutes: the data pipeline end to end against the step alone (scripts/bench_pipeline.py),
# then the fused SE tail's Triton kernels against its torch ops and `torch.library.opcheck` of its
# custom op (tests/test_fused_se.py run as a script; in Triton's interpreter on a CPU), and the
# fused SE block against the plain twin and timm, eager and compiled (scripts/bench_train.py).
#
#   bash scripts/gpu_check.sh                 # needs torch, torchvision, timm, tensorboard, tqdm, pytest
#   DEPS=/path/to/hydra_omegaconf_antlr4 bash scripts/gpu_check.sh   # where hydra-core is not installed
#   PATH=.venv/bin:$PATH DEVICE=cpu TINY=--tiny bash scripts/gpu_check.sh   # the dry run, on a CPU
#
# The machine needs hydra-core, omegaconf and antlr4 importable, and pytest (with pluggy, iniconfig
# and packaging) for the kernel check: DEPS names a folder holding those missing there, copied from
# a venv's site-packages (they are pure Python). `make gpu-deps` copies them from .venv into
# .gpu_deps (ignored by git), the default; the device tool's call then carries it:
#   run(command="bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log", carry=[".gpu_deps"])
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:${DEPS:-.gpu_deps}${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-}
PART=${PART:-all}   # pipeline | fused | all

if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
python -c "import torch, torchvision, hydra; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cpus', __import__('os').cpu_count())"

if [ "$PART" != fused ]; then
  echo "## bench_pipeline ($DEVICE)"
  timeout 240 python -W ignore scripts/bench_pipeline.py --device "$DEVICE" $TINY || echo "bench_pipeline exited $?"
fi
if [ "$PART" != pipeline ]; then
  echo "## fused SE kernels and custom op ($DEVICE)"
  TRITON_INTERPRET=$([ "$DEVICE" = cpu ] && echo 1 || echo 0) timeout 120 python -W ignore tests/test_fused_se.py || echo "tests/test_fused_se.py exited $?"
  echo "## bench_train fused SE ($DEVICE)"
  timeout 240 python -W ignore scripts/bench_train.py --fused-check --rounds 3 --device "$DEVICE" ${TINY:+--batch-size 4 --size 64 --steps 1} || echo "bench_train --fused-check exited $?"
fi
