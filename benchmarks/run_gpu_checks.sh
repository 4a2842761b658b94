#!/usr/bin/env bash
# The GPU checks of the fused kernels, in one go (for a CUDA machine; not part of CI):
#   1. build and install dbae against the CUDA torch found here (falls back to the pure-Python
#      package when the build fails, so that the Triton and reference checks still run),
#   2. the fused-kernel and runner tests, now on CUDA (parity, CUDA graphs, compiled Triton kernels;
#      ONNX Runtime CUDA and TensorRT where onnxruntime-gpu / tensorrt are installed),
#   3. a short CUDA training run with the fused ops against the reference path,
#   4. both kernel benchmarks (GB/s against the device-to-device copy of the same run),
#   5. the deployment latency benchmark (eager against CUDA graphs, ffhq128 random weights),
#   6. DBAE against DiffAE and PDAE at the authors' step counts (paper Table 5, ffhq128),
#   7. where one ffhq128 U-Net evaluation spends its GPU time, per set of the runners' levers,
#   8. ffhq128 training throughput (images/s): fp32 eager against bf16, bf16 + --compile, and
#      bf16 + --compile + --channels-last (THROUGHPUT_STEPS steps at THROUGHPUT_BATCH),
#   9. the authors' FFHQ128 DBAE at real size (random weights in their file layout, built from its
#      key list) through `dbae import` and the latency benchmark of the CUDA-graph runners.
#
#   bash benchmarks/run_gpu_checks.sh [OUTPUT_DIR]      # default: runs/gpu_checks
#
# Every step writes its log and JSON under OUTPUT_DIR; a failing step does not stop the others.
# With ARCHIVE=path.tgz set, OUTPUT_DIR is packed into that archive after every step (so that a
# run cut short still leaves everything it finished in one file). CHECKS picks the steps
# (default: all of build tests bench_step bench_train train latency compare profile throughput official; "stage"
# instead of "build" runs the pure-Python package without building the extension); BENCH_TRAIN_SIZES the
# sizes of the training-kernel benchmark and BENCH_TRAIN_CONFIGS its launch settings (WARPS:ROUNDS
# ...); BENCH_STEP_BATCHES the batches of the sampler-step benchmark; LATENCY_RUNNERS the runners of the latency benchmark
# (the compiled ones spend minutes in inductor first), LATENCY_BATCHES its batches, LATENCY_FLAGS more of
# its options (--channels-last, --autocast); PROFILE_VARIANTS and THROUGHPUT_VARIANTS the flag sets
# (separated by ';') of the U-Net profiles and the training-throughput runs; *_TIMEOUT the
# steps' limits in seconds, TEST_TIMEOUT the limit of one test.
set -u
out=${1:-runs/gpu_checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
status=()
checks=" ${CHECKS:-build tests bench_step bench_train train latency compare profile throughput official} "
want() { [[ $checks == *" $1 "* ]]; }

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND, tees its output to OUTPUT_DIR/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-25}" "$out/$name.log"
  status+=("$name rc=$rc $(($(date +%s) - start))s")
  printf '%s\n' "${status[@]}" >"$out/status.txt"
  [[ -n ${ARCHIVE:-} ]] && tar czf "$ARCHIVE" -C "$out" .
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >"$out/device.txt" 2>&1
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$out/device.txt" 2>&1
nvcc --version | tail -n 2 >>"$out/device.txt" 2>&1
cat "$out/device.txt"

stage_python_package() {  # dbae as installed, without the compiled extension (no dbae._C, no dbae/_ops.so)
  local stage=/tmp/dbae_stage
  rm -rf "$stage" && mkdir -p "$stage"
  cp -r dbae "$stage/dbae" && cp -r kernels "$stage/dbae/kernels" && cp -r export "$stage/dbae/export"
  export PYTHONPATH=$stage
}
if want build && ! TAIL_LINES=40 step build 300 $py -m pip install --no-build-isolation --no-deps -v -e .; then
  echo "build failed: staging the pure-Python package"
  stage_python_package
elif want stage; then  # CHECKS=stage: skip the build (the Triton kernels and the reference ops only)
  stage_python_package
fi
$py -c "from dbae import fused_step as fs; print('fused-step report:', fs.report(), 'kernel devices:', fs.KERNEL_DEVICES)" 2>&1 | tee "$out/report.txt"

# One line per test as it finishes (-v: a run cut short still says what passed and failed), the
# failures' tracebacks at the end. pytest-xdist, where installed, keeps going past a test that
# crashes its worker; pytest-timeout, where installed, stops a hung test.
plugins=$($py -c "import xdist" 2>/dev/null && echo "-n 4")
plugins+=$($py -c "import pytest_timeout" 2>/dev/null && echo " --timeout ${TEST_TIMEOUT:-90}")
# shellcheck disable=SC2086
want tests && TAIL_LINES=60 step tests "${TESTS_TIMEOUT:-240}" $py -m pytest -v -rfE --tb=short $plugins \
  -p no:cacheprovider -p no:benchmark --junitxml="$out/tests.xml" \
  tests/test_fused_step.py tests/test_triton_kernels.py tests/test_fused_training.py tests/test_fused_sampling.py \
  tests/test_runners_torch.py tests/test_ext.py tests/test_export_onnx.py

want bench_step && step bench_step "${BENCH_STEP_TIMEOUT:-100}" $py benchmarks/bench_sampler_step.py --device cuda \
  --batches ${BENCH_STEP_BATCHES:-1 16 128} --sizes 64 128 --min-time 0.1 --json "$out/bench_sampler_step.json"
# shellcheck disable=SC2086
want bench_train && step bench_train "${BENCH_TRAIN_TIMEOUT:-75}" $py benchmarks/bench_triton_train.py \
  --sizes ${BENCH_TRAIN_SIZES:-1x64 16x64 128x64 128x128} ${BENCH_TRAIN_CONFIGS:+--configs $BENCH_TRAIN_CONFIGS} \
  --json "$out/bench_triton_train.json"

if want train; then
  for kernels in auto reference; do
    DBAE_KERNELS=$kernels step "train_$kernels" 60 $py -m dbae.cli.main train --preset shapes32 --device cuda \
      --precision bf16 --steps 300 --log-every 100 --sample-every 100000 --ckpt-every 100000 --no-progress \
      --out "/tmp/train_$kernels"
  done
fi

# shellcheck disable=SC2086
want latency && step latency "${LATENCY_TIMEOUT:-400}" $py -m dbae.cli.main bench latency --preset ffhq128 \
  --device cuda --runners ${LATENCY_RUNNERS:-eager cuda-graph cuda-graph-compiled} --steps 4 10 --batches ${LATENCY_BATCHES:-1 8} \
  --precision bf16 --runs 20 ${LATENCY_FLAGS:-} --out "$out/latency"

# the paper's Table 5 setting on this GPU: DBAE against DiffAE and PDAE (random weights: cost only)
want compare && step compare "${COMPARE_TIMEOUT:-300}" $py -m dbae.cli.main bench compare --preset ffhq128 \
  --device cuda --precision bf16 --batch 1 --runs 5 --warmup 1 --out "$out/compare"

# the per-evaluation budget of the latency targets: which kernels take a U-Net evaluation's time,
# per set of the runners' levers (PROFILE_VARIANTS: flag sets separated by ';')
if want profile; then
  IFS=';' read -r -a variants <<<"${PROFILE_VARIANTS:-; --cast; --cast --channels-last --cudnn-benchmark; --compile; --compile --cast --channels-last --cudnn-benchmark; --compile --cast --channels-last --cudnn-benchmark --freeze}"
  for variant in "${variants[@]}"; do
    name=profile$(echo "$variant" | tr -d '-' | tr -s ' ' '_')
    # shellcheck disable=SC2086
    step "$name" "${PROFILE_TIMEOUT:-300}" $py benchmarks/profile_unet.py --preset ffhq128 --iters 20 $variant \
      --json "$out/$name.json"
  done
fi

# training throughput of the paper's ffhq128 preset (random data of the built-in shapes at 128)
if want throughput; then
  IFS=';' read -r -a variants <<<"${THROUGHPUT_VARIANTS:-fp32; bf16; bf16 --compile; bf16 --compile --channels-last}"
  for variant in "${variants[@]}"; do
    variant=$(echo $variant)  # trimmed
    name=throughput_$(echo "$variant" | tr -d '-' | tr ' ' '_')
    # shellcheck disable=SC2086
    step "$name" "${THROUGHPUT_TIMEOUT:-300}" $py -m dbae.cli.main train --preset ffhq128 --device cuda \
      --precision $variant --steps "${THROUGHPUT_STEPS:-40}" --batch-size "${THROUGHPUT_BATCH:-32}" --log-every 10 \
      --sample-every 100000 --ckpt-every 100000 --no-progress --out "/tmp/$name"
    cp "/tmp/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
    [[ -n ${ARCHIVE:-} ]] && tar czf "$ARCHIVE" -C "$out" .
  done
fi

# the authors' released FFHQ128 layout (random weights), imported, then timed like the presets
if want official; then
  step official_build 120 $py benchmarks/bench_import.py --build-only /tmp/ema_0.9999_1020000.pt &&
    step official_import 120 $py -m dbae.cli.main import /tmp/ema_0.9999_1020000.pt --out /tmp/ffhq128-official &&
    step official_latency "${LATENCY_TIMEOUT:-400}" $py -m dbae.cli.main bench latency --ckpt /tmp/ffhq128-official \
      --device cuda --runners ${LATENCY_RUNNERS:-eager cuda-graph cuda-graph-compiled} --steps 4 10 \
      --batches ${LATENCY_BATCHES:-1 8} --precision bf16 --runs 20 ${LATENCY_FLAGS:-} --out "$out/latency_official"
fi

cat "$out/status.txt"
