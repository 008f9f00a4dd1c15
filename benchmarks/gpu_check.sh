#!/usr/bin/env bash
# The GPU check of the SAE core, as one script (a few minutes on one H100/H200):
# the gpu-marked tests, then the training-step benchmark at the paper's GPT-2 shape in
# bf16-mixed and fp32 against the GEMM + top-k floor at the same precision.
#   bash benchmarks/gpu_check.sh            (from the repo root, torch with CUDA installed)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tail -5
for precision in bf16-mixed 32; do
  python benchmarks/train_step.py --device cuda --precision "$precision" --no-naive --reps 10 \
    --shapes 768,32768,32,131072 768,32768,32,16384
done
# The same with cuSPARSE for the sparse backward instead of chunked gathers / index_add
# (sae_lit/kernels.py, SAE_LIT_CUDA_SPARSE): which one should be the default on GPUs.
SAE_LIT_CUDA_SPARSE=csr python benchmarks/train_step.py --device cuda --precision bf16-mixed --no-naive \
  --reps 10 --shapes 768,32768,32,131072
# Latent parallelism: the gpu-marked tests above include tests/test_latent_parallel_gpu.py (one
# shard on one GPU; two NCCL shards where there are 2+ GPUs). Then the memory model
# (benchmarks/memory_model.py, the README's H200 table) against the step's peak CUDA memory.
PYTHONPATH=. python benchmarks/memory_model.py --measure-cuda
