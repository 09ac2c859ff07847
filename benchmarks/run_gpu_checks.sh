#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run (a few minutes on one GPU): the GPU tests,
# the BatchNorm kernel ratios against cuDNN, and gpu_check.py's JSON. Results go to ${OUT:-.}.
# Run from the repository root:  bash benchmarks/run_gpu_checks.sh
set -u
out=${OUT:-.}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
echo "== GPU tests"
timeout 240 $py -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_functional.py \
    tests/test_batchnorm.py tests/test_sync_batchnorm.py tests/test_validate.py \
    tests/test_tensorrt.py tests/test_kernel_triton.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
echo "== BatchNorm kernel vs cuDNN"
timeout 120 $py benchmarks/bn_kernel.py --device cuda --dtypes float32,float16,bfloat16 \
    --repeats 50 --json "$out/bn_kernel_cuda.json"
echo "== gpu_check.py"
timeout 240 $py benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tail -30
