#!/usr/bin/env bash
# The GPU check of the TensorRT plugins, from the project's source alone (no TensorRT library,
# no network): builds the plugin library and two test programs with nvcc, then
#   1. trt_plugins/tests/gpu_check.cu     every kernel launcher vs the CPU path (runOnHost: the
#                                         same __host__ __device__ per-element code run serially),
#                                         small edge-case shapes, then LLaVA-1.5-7B shapes, timed;
#   2. trt_plugins/tests/gpu_enqueue.cu   every plugin of libsparsevlm_plugins.so driven as TensorRT
#                                         drives it (createPlugin, configurePlugin, getWorkspaceSize,
#                                         onShapeChange, enqueue) with device buffers, vs the CPU
#                                         path, timed.
# LLaVA-1.5-7B shapes: B = 1 and 8, 576 visual tokens, hidden size 4096, float32 and float16
# (trt_plugins/tests/llava_cases.h). Each row prints the CPU path's time, the device time (CUDA
# events, median of --runs after --warmup), the achieved bandwidth (bytes moved / time) and the
# arithmetic rate (FLOPs / time: TokenRecycle's Gram product, 2*P*P*D per row, and merge;
# RankKeepCount's Jacobi SVD as the CPU path counted it), with each op's byte and FLOP formulas
# printed above the table.
#
#   bash benchmarks/gpu_check.sh               on a machine with a CUDA GPU (a few minutes)
#   bash benchmarks/gpu_check.sh --dry-run     no GPU needed: compiles everything, runs the CPU
#                                              path at the same shapes (checked by brute force)
#                                              and the plugins up to onShapeChange, prints the
#                                              table with "n/a (dry run)" times
# Options: --build-dir DIR (default $TMPDIR/sparsevlm-gpu-check; reused across runs),
#          --arch NN (CUDA architecture, default: the GPU's, e.g. 90 for H100/H200; 80 in --dry-run),
#          --warmup N (default 3), --runs N (default 20).
# Needs nvcc (CUDA 12/13), CMake >= 3.20 and the TensorRT headers (NvInfer.h), looked up in order:
#   $TENSORRT_INCLUDE, $TensorRT_INCLUDE_DIR, $TENSORRT_ROOT/include, then the kernel-lens wheel
#   (pip install --no-deps kernel-lens) of $PYTHON, ./.venv/bin/python or python3.
# Exit 0 when every check passed; 1 when a check failed, no GPU was found (without --dry-run) or
# the plugins' enqueue could not be checked; 2 on bad usage or a missing tool.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS="$REPO/trt_plugins"

dry_run=0
build_dir="${TMPDIR:-/tmp}/sparsevlm-gpu-check"
arch=""
warmup=3
runs=20

usage() { # $1: what was wrong
    echo "gpu_check.sh: $1 (usage: bash benchmarks/gpu_check.sh [--dry-run] [--build-dir DIR] [--arch NN] [--warmup N] [--runs N])" >&2
    exit 2
}
positive() { [[ "$1" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: $2 expects a positive integer, got '$1'" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --build-dir|--arch|--warmup|--runs) [ $# -ge 2 ] || usage "$1 expects a value" ;;&
        --build-dir) build_dir="$2"; shift ;;
        --arch) positive "$2" --arch; arch="$2"; shift ;;
        --warmup) positive "$2" --warmup; warmup="$2"; shift ;;
        --runs) positive "$2" --runs; runs="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) usage "unknown argument '$1'" ;;
    esac
    shift
done

started=$SECONDS
failures=()
step() { echo; echo "== $* ($((SECONDS - started)) s)"; }

# --- Tools ---------------------------------------------------------------------------------------
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ]; then
    echo "gpu_check.sh: nvcc not found (PATH, \$NVCC or /usr/local/cuda/bin/nvcc): install the CUDA toolkit" >&2
    exit 2
fi
export PATH="$(dirname "$nvcc"):$PATH" # CMake finds the same nvcc

find_tensorrt_include() {
    local candidates=("${TENSORRT_INCLUDE:-}" "${TensorRT_INCLUDE_DIR:-}")
    [ -n "${TENSORRT_ROOT:-}" ] && candidates+=("$TENSORRT_ROOT/include")
    local python
    for python in "${PYTHON:-}" "$REPO/.venv/bin/python" "$(command -v python3 || true)"; do
        [ -n "$python" ] && [ -x "$python" ] || continue
        # Located without importing kernel_lens (that would import torch and triton).
        candidates+=("$("$python" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("kernel_lens")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "include" / "tensorrt" if spec else "")' 2>/dev/null)")
    done
    local folder
    for folder in "${candidates[@]}"; do
        if [ -n "$folder" ] && [ -f "$folder/NvInfer.h" ]; then
            (cd "$folder" && pwd) # absolute: CMake would read a relative one against trt_plugins/
            return 0
        fi
    done
    return 1
}

tensorrt_include="$(find_tensorrt_include || true)"
missing_headers=""
if [ -z "$tensorrt_include" ]; then
    missing_headers="TensorRT headers (NvInfer.h) not found: set TENSORRT_INCLUDE to the folder holding NvInfer.h (a TensorRT install's include/, a checkout of github.com/NVIDIA/TensorRT's include/, or kernel_lens/include/tensorrt from 'pip install --no-deps kernel-lens'), or TENSORRT_ROOT to a folder with include/NvInfer.h. Without them the plugin library and its enqueue are not checked."
elif ! command -v cmake >/dev/null; then
    missing_headers="cmake not found: it builds the plugin library (CMake >= 3.20). Without it the plugins' enqueue is not checked."
fi

if [ -z "$arch" ]; then
    if [ "$dry_run" = 1 ]; then
        arch=80
    else
        capability="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
        arch="${capability:-90}"
    fi
fi

echo "gpu_check.sh: $([ "$dry_run" = 1 ] && echo "dry run (no GPU used)" || echo "GPU run"), sm_$arch, build folder $build_dir"
echo "nvcc: $nvcc ($("$nvcc" --version | tail -n1))"
echo "TensorRT headers: ${tensorrt_include:-none}"
[ "$dry_run" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
mkdir -p "$build_dir" || exit 2

# --- Build -------------------------------------------------------------------------------------------
library=""
if [ -z "$missing_headers" ]; then
    step "CMake build of libsparsevlm_plugins.so"
    if cmake -S "$PLUGINS" -B "$build_dir" -DTensorRT_INCLUDE_DIR="$tensorrt_include" \
            -DCMAKE_CUDA_ARCHITECTURES="$arch" >"$build_dir/cmake-configure.log" 2>&1 \
        && cmake --build "$build_dir" --parallel "$(nproc 2>/dev/null || echo 2)" >"$build_dir/cmake-build.log" 2>&1; then
        library="$build_dir/libsparsevlm_plugins.so"
        echo "built $library"
    else
        echo "FAIL: the CMake build failed; the last lines of its log:"
        tail -n 30 "$build_dir/cmake-configure.log" "$build_dir/cmake-build.log" 2>/dev/null
        failures+=("CMake build")
    fi
else
    step "CMake build of libsparsevlm_plugins.so: skipped"
    echo "$missing_headers"
fi

step "nvcc: gpu_check and gpu_enqueue"
nvcc_flags=(-std=c++17 -O2 "-arch=sm_$arch")
# The launchers as the library has them (the CMake objects), else compiled from the sources.
kernel_objects=()
for source in "$PLUGINS"/*/*_kernel.cu; do
    object="$build_dir/CMakeFiles/sparsevlm_plugin_objects.dir/$(basename "$(dirname "$source")")/$(basename "$source").o"
    [ -n "$library" ] && [ -f "$object" ] && kernel_objects+=("$object") || kernel_objects+=("$source")
done
"$nvcc" "${nvcc_flags[@]}" "$PLUGINS/tests/gpu_check.cu" "${kernel_objects[@]}" -o "$build_dir/gpu_check" \
    >"$build_dir/gpu_check-build.log" 2>&1 &
check_build=$!
enqueue_build=""
if [ -n "$library" ]; then
    "$nvcc" "${nvcc_flags[@]}" -isystem "$tensorrt_include" "$PLUGINS/tests/gpu_enqueue.cu" -o "$build_dir/gpu_enqueue" -ldl \
        >"$build_dir/gpu_enqueue-build.log" 2>&1 &
    enqueue_build=$!
fi
if wait "$check_build"; then
    echo "built $build_dir/gpu_check"
else
    echo "FAIL: nvcc gpu_check.cu:"; tail -n 30 "$build_dir/gpu_check-build.log"
    failures+=("gpu_check build")
fi
if [ -n "$enqueue_build" ]; then
    if wait "$enqueue_build"; then
        echo "built $build_dir/gpu_enqueue"
    else
        echo "FAIL: nvcc gpu_enqueue.cu:"; grep -v -e '^$' "$build_dir/gpu_enqueue-build.log" | tail -n 30
        failures+=("gpu_enqueue build")
        enqueue_build=""
    fi
fi

# --- Run ----------------------------------------------------------------------------------------------
# run NAME COMMAND...: records a failure unless the command exits 0 (77: no CUDA device).
run() {
    local name="$1"
    shift
    timeout 300 "$@"
    local status=$?
    if [ "$status" = 77 ]; then
        echo "FAIL: $name: no CUDA device visible (nvidia-smi, CUDA_VISIBLE_DEVICES); use --dry-run on a machine without one"
        failures+=("$name: no GPU")
    elif [ "$status" != 0 ]; then
        echo "FAIL: $name exited with status $status"
        failures+=("$name")
    fi
}

timing=(--warmup "$warmup" --runs "$runs")
if [ -x "$build_dir/gpu_check" ] && [[ ! " ${failures[*]-} " =~ "gpu_check build" ]]; then
    if [ "$dry_run" = 1 ]; then
        step "gpu_check --llava --dry-run: the CPU path at LLaVA-1.5-7B shapes"
        run "gpu_check (dry run)" "$build_dir/gpu_check" --llava --dry-run
    else
        step "gpu_check: every kernel vs the CPU path, small and edge-case shapes"
        run "gpu_check" "$build_dir/gpu_check"
        step "gpu_check --llava: every kernel at LLaVA-1.5-7B shapes, timed"
        run "gpu_check --llava" "$build_dir/gpu_check" --llava "${timing[@]}"
    fi
fi
if [ -n "$enqueue_build" ]; then
    if [ "$dry_run" = 1 ]; then
        step "gpu_enqueue --dry-run: the plugins up to onShapeChange at LLaVA-1.5-7B shapes"
        run "gpu_enqueue (dry run)" "$build_dir/gpu_enqueue" "$library" --dry-run
    else
        step "gpu_enqueue: every plugin's enqueue at LLaVA-1.5-7B shapes, timed"
        run "gpu_enqueue" "$build_dir/gpu_enqueue" "$library" "${timing[@]}"
    fi
elif [ -n "$missing_headers" ]; then
    step "gpu_enqueue: skipped"
    echo "$missing_headers"
    [ "$dry_run" = 1 ] || failures+=("enqueue not checked (no TensorRT headers or cmake)")
fi

echo
if [ ${#failures[@]} -eq 0 ]; then
    echo "gpu_check.sh: every check passed$([ "$dry_run" = 1 ] && echo " (dry run: no device code ran)") in $((SECONDS - started)) s"
    exit 0
fi
echo "gpu_check.sh: FAILED: $(IFS=';'; echo "${failures[*]}") ($((SECONDS - started)) s)"
exit 1
