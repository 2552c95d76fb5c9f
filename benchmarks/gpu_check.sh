#!/bin/bash
# The CUDA checks in one go (for a short GPU lease): GPU tests, then training, inference, evaluation
# and re-ranking throughput. Run from the repository root; writes logs to ${OUT:-/tmp/cgpn-gpu}.
# Needs torch with CUDA; fastreid (eval peer) and faiss are optional: pip install -q --no-deps fastreid faiss-cpu
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cgpn-gpu}
mkdir -p "$OUT"
step() { echo "=== $*"; }

step device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

step "tests marked gpu"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_rank.py tests/test_rerank.py \
    tests/test_transforms.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"

step "training step (CGPN-R50 384x128, batch 64)"
timeout 150 python3 benchmarks/train_speed.py --device cuda --steps 10 --workers 8 2>&1 \
    | grep -v Warning | tail -14 | tee "$OUT/train_speed.txt"

step "inference (CGPN-R50 384x128, synthetic images)"
python3 -m cgpn -q synth --out /tmp/cgpn-synth --preset demo >/dev/null
timeout 60 python3 benchmarks/infer_speed.py --device cuda --paths eager,channels_last,bf16 --batch-size 64 \
    --data-root /tmp/cgpn-synth 2>&1 \
    | tail -6 | tee "$OUT/infer_speed.txt"

step "tracker embedder (20 boxes in a 1080p frame, demo-size network)"
timeout 90 python3 benchmarks/embed_speed.py --device cuda --backends eager,bf16 --repeats 5 2>&1 \
    | grep -v Warning | tail -4 | tee "$OUT/embed_speed.txt"

step "evaluation (Market-1501 size) and re-ranking"
timeout 60 python3 benchmarks/eval_speed.py --device cuda --repeat 3 2>&1 | tail -4 | tee "$OUT/eval_speed.txt"
timeout 60 python3 benchmarks/rerank_speed.py --device cuda --skip-peer 2>&1 | tail -4 | tee "$OUT/rerank_speed.txt"

step "training step under torch.compile (bf16, channels_last)"
timeout 180 python3 benchmarks/train_speed.py --device cuda --steps 10 --workers 8 --precisions bf16 \
    --formats channels_last --no-baseline --compile 2>&1 | grep -v Warning | tail -6 | tee "$OUT/train_compile.txt"
