#!/usr/bin/env bash
# The prepared GPU runs for issue 5, in two parts, each one device call of under ~9 minutes (a lent machine
# allows 10 minutes a call and 15 in all), each leaving at most 8 files in OUT:
#   bash benchmarks/gpu_run.sh OUT step    # CUDA tests; the search step vs FP with a profile (eager variants and the
#                                          # CUDA-graph replay side by side); the candidates (+bnteacher: the
#                                          # teacher before the BatchNorm fold, +recompute: the operands recomputed
#                                          # in backward, the default before session 18) in a separate call beside
#                                          # triton+graph; foreach vs fused SGD
#   bash benchmarks/gpu_run.sh OUT loops   # the QAT fine-tune step, precision: auto vs float32, a whole search
#   bash benchmarks/gpu_run.sh OUT teacher # session 19: the teacher's pass on its own stream (+tstream) beside the
#                                          # replayed step, with cuDNN's autotuner off and on, a kernel-level profile,
#                                          # and the teacher's parts (bench_teacher_parts.py)
#   bash benchmarks/gpu_run.sh OUT weights  # next lease: the Triton weight-mixture kernels' GPU tests and +tweights
#                                          # beside the product's step (then flip fused_kernels.TRITON_WEIGHT_KERNELS)
#   bash benchmarks/gpu_run.sh OUT teacher2 # the teacher split at its Grad-CAM layer (+tsplit), compiled (+tcompile), its
#                                          # stem as im2col (+tunfold), with and without its own stream; GPU tests
#   bash benchmarks/gpu_run.sh OUT         # step and loops, one after the other (over 10 minutes: two calls are safer)
# COMPILED=1 adds the compiled variant (TorchInductor; its first step includes compilation) to "step".
# Runs with the machine's own python3 (torch + triton); gmpq_core needs only torch/torchvision/numpy.
set -u
OUT=${1:-${OUT:-benchmarks/results/gpu}}
PART=${2:-all}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
quiet() { grep -v -E "^(STAGE|USDT|\[W)"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$OUT/machine.txt"

if [ "$PART" = step ] || [ "$PART" = all ]; then
  echo "== CUDA correctness tests (mixture kernels, CUDA-graph replay against the eager step, precision, kept operands)"
  timeout ${TEST_S:-100} $PY -m pytest tests/gmpq_core/test_graph_step.py tests/gmpq_core/test_fused.py \
    tests/gmpq_core/test_fused_conv.py tests/gmpq_core/test_quantizers.py tests/gmpq_core/test_qmodules.py \
    tests/gmpq_core/test_precision.py -m gpu -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"

  echo "== search step vs FP, side by side (ResNet-18 224 px and ResNet-20 28 px, batch 256, bf16, channels_last)"
  # the CUDA-graph variant in the same process as the eager ones; if it fails, the eager ones again without it
  timeout ${BENCH_S:-200} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} \
    --variants reference,fused,triton,triton+graph --json "$OUT/gpu.json" --profile "$OUT/prof" 2>&1 \
    | quiet | tail -20 | tee "$OUT/bench.log"
  if [ ! -s "$OUT/gpu.json" ]; then
    echo "== again without the CUDA-graph variant"
    timeout 120 $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} --variants reference,fused,triton \
      --json "$OUT/gpu_eager.json" 2>&1 | quiet | tail -20 | tee -a "$OUT/bench.log"
  fi
  tar czf "$OUT/profiles.tgz" -C "$OUT" prof 2>/dev/null && rm -rf "$OUT/prof"

  echo "== candidates beside the replayed step: the teacher with its BatchNorms, operands recomputed in backward"
  timeout ${CAND_S:-150} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} --models resnet18:224:3 \
    --variants triton+graph,triton+graph+bnteacher,triton+graph+recompute --json "$OUT/gpu_candidates.json" 2>&1 \
    | quiet | tail -8 | tee "$OUT/candidates.log"

  echo "== torch's default SGD (foreach on CUDA) against the fused SGD every loop now uses, inside FP training steps"
  timeout ${OPT_S:-60} $PY benchmarks/bench_optimizer.py --device cuda --json "$OUT/optimizer.json" 2>&1 \
    | quiet | tail -5 | tee "$OUT/optimizer.log"

  if [ -n "${COMPILED:-}" ]; then
    echo "== compiled variant (TorchInductor kernels; first step includes compilation)"
    timeout 180 $PY benchmarks/bench_search_step.py --device cuda --variants compiled,triton \
      --json "$OUT/gpu_compiled.json" 2>&1 | quiet | tail -20 | tee "$OUT/bench_compiled.log"
  fi
fi

if [ "$PART" = loops ] || [ "$PART" = all ]; then
  echo "== QAT fine-tune step vs FP, side by side (reference quantizers against the fused/Triton layers of session 12)"
  timeout ${QAT_S:-120} $PY benchmarks/bench_qat_step.py --device cuda --json "$OUT/qat.json" 2>&1 \
    | quiet | tail -8 | tee "$OUT/qat.log"
  echo "== what precision: auto (bf16 + channels_last) buys the product's training loops over float32"
  timeout ${PREC_S:-120} $PY benchmarks/bench_qat_step.py --device cuda --precisions --json "$OUT/qat_precisions.json" \
    2>&1 | quiet | tail -12 | tee "$OUT/qat_precisions.log"
  echo "== a whole search (real Fashion-MNIST, ResNet-18) in float32 and under precision: auto (bf16 + channels_last;"
  echo "   CUDA graphs on in both; session 11 measured graphs on/off). Needs data/FashionMNIST/raw carried"
  timeout ${WHOLE_S:-150} $PY benchmarks/bench_search_graph.py --device cuda --compare precision --rounds 1 \
    --json "$OUT/search_precision.json" 2>&1 | quiet | tail -6 | tee "$OUT/search_precision.log"
fi

if [ "$PART" = teacher ]; then
  echo "== CUDA tests of the replayed step (the teacher's own stream among them)"
  timeout ${TEST_S:-100} $PY -m pytest tests/gmpq_core/test_graph_step.py -m gpu -q -p no:cacheprovider 2>&1 \
    | tail -15 | tee "$OUT/gpu_tests.log"
  echo "== the teacher on its own stream beside the replayed step (ResNet-18 224 px), with a kernel-level profile"
  timeout ${BENCH_S:-150} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} --models resnet18:224:3 \
    --variants triton+graph,triton+graph+tstream --json "$OUT/tstream.json" --profile "$OUT/prof" 2>&1 \
    | quiet | tail -6 | tee "$OUT/tstream.log"
  tar czf "$OUT/profiles.tgz" -C "$OUT" prof 2>/dev/null && rm -rf "$OUT/prof"
  echo "== the same with cuDNN's autotuner on (torch.backends.cudnn.benchmark, FP too), and ResNet-20 at 28 px"
  timeout ${BENCH2_S:-120} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} --cudnn-benchmark \
    --models resnet18:224:3,resnet20:28:1 --variants triton+graph,triton+graph+tstream --json "$OUT/tstream_cudnn.json" \
    2>&1 | quiet | tail -8 | tee "$OUT/tstream_cudnn.log"
  echo "== the teacher's parts: stem conv layouts and padding, max pool, compiled trunk"
  timeout ${PARTS_S:-120} $PY benchmarks/bench_teacher_parts.py ${PARTS_COMPILE---compile} --json "$OUT/teacher_parts.json" 2>&1 \
    | quiet | tail -40 | tee "$OUT/teacher_parts.log"
fi

if [ "$PART" = teacher2 ]; then
  echo "== CUDA tests: the replayed step, the split / compiled teacher"
  timeout ${TEST_S:-150} $PY -m pytest tests/gmpq_core/test_graph_step.py tests/gmpq_core/test_teacher_pass.py -m gpu -q \
    -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  echo "== the teacher's pass split at its Grad-CAM layer, compiled, its stem as im2col, on its own stream"
  timeout ${BENCH_S:-240} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-10} \
    --models resnet18:224:3,resnet20:28:1 --variants triton+graph,triton+graph+tstream,triton+graph+tsplit+tunfold,\
triton+graph+tcompile,triton+graph+tstream+tcompile,triton+graph+tstream+tcompile+tunfold --json "$OUT/teacher_pass.json" \
    2>&1 | quiet | tail -16 | tee "$OUT/teacher_pass.log"
  echo "== an eager step's operators by input shape (which tensors the slow adds get)"
  timeout ${PROF_S:-90} $PY benchmarks/bench_search_step.py --device cuda --steps 2 --models resnet18:224:3 --variants triton \
    --no-memory --profile "$OUT/prof" 2>&1 | quiet | tail -3
  tar czf "$OUT/profiles.tgz" -C "$OUT" prof 2>/dev/null && rm -rf "$OUT/prof"
  echo "== the stem as im2col + GEMM beside cuDNN"
  PARTS_COMPILE= timeout 60 $PY benchmarks/bench_teacher_parts.py --json "$OUT/teacher_parts.json" 2>&1 | quiet \
    | grep -E "stem|maxpool|teacher_gradcam|cudnn" | tee "$OUT/teacher_parts.log"
fi

if [ "$PART" = teacher3 ]; then
  echo "== CUDA tests (graph replay, the split / compiled teacher, mixture kernels, precision)"
  timeout ${TEST_S:-200} $PY -m pytest tests/gmpq_core/test_graph_step.py tests/gmpq_core/test_teacher_pass.py \
    tests/gmpq_core/test_fused.py tests/gmpq_core/test_fused_conv.py tests/gmpq_core/test_precision.py -m gpu -q \
    --tb=short -p no:logging -p no:cacheprovider 2>&1 | grep -v DEBUG | tail -40 | tee "$OUT/gpu_tests.log"
  echo "== the search step as the product runs it now (ResNet-18 224 px: teacher stream + compiled trunk + im2col stem)"
  timeout ${BENCH_S:-200} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-20} --models resnet18:224:3 \
    --variants triton+graph,triton+graph+tstream+tcompile+tunfold --json "$OUT/teacher_default.json" 2>&1 | quiet \
    | tail -4 | tee "$OUT/teacher_default.log"
fi

if [ "$PART" = teacher4 ]; then
  echo "== CUDA tests: a whole search with graphs against the eager search (the teacher's stream on by default now)"
  timeout ${TEST_S:-120} $PY -m pytest tests/gmpq_core/test_graph_step.py -k "whole or search_with_graphs" -m gpu -q \
    --tb=short -p no:cacheprovider 2>&1 | grep -v DEBUG | tail -15 | tee "$OUT/gpu_tests.log"
  for rep in 1 2; do
    echo "== the search step as the product runs it, process $rep (and with Inductor's freezing)"
    timeout ${BENCH_S:-110} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-20} --models resnet18:224:3 \
      --variants triton+graph,triton+graph+tstream+tcompile+tunfold,triton+graph+tstream+tunfold+tfreeze \
      --json "$OUT/teacher_default_$rep.json" 2>&1 | quiet | tail -4 | tee "$OUT/teacher_default_$rep.log"
  done
fi

if [ "$PART" = weights ]; then
  echo "== CUDA tests: the Triton weight-mixture kernels (session 19, written without a GPU), the fused layers"
  timeout ${TEST_S:-120} $PY -m pytest tests/gmpq_core/test_fused.py tests/gmpq_core/test_fused_conv.py \
    tests/gmpq_core/test_teacher_pass.py -m gpu -q --tb=short -p no:cacheprovider 2>&1 | grep -v DEBUG | tail -25 \
    | tee "$OUT/gpu_tests.log"
  echo "== the product's step with the weight mixtures in Triton kernels too (+tweights), two processes"
  for rep in 1 2; do
    timeout ${BENCH_S:-120} $PY benchmarks/bench_search_step.py --device cuda --steps ${STEPS:-20} --models resnet18:224:3 \
      --variants triton+graph+tstream+tcompile+tunfold,triton+graph+tstream+tcompile+tunfold+tweights \
      --json "$OUT/tweights_$rep.json" 2>&1 | quiet | tail -4 | tee "$OUT/tweights_$rep.log"
  done
fi

# at most 8 files come back from a lent machine: the logs travel as one archive (their tails were printed)
(cd "$OUT" && tar czf "logs_$PART.tgz" ./*.log ./*.txt 2>/dev/null && rm -f ./*.log ./*.txt)
ls -la "$OUT"
