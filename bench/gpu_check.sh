#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repository root, with $OUT set to a folder
# whose files come back: it installs what the machine's Python lacks, runs every test that is
# skipped without CUDA, bench/gpu_speed.py (ours against diffusers, eager, then ours compiled
# with and without CUDA graphs) and bench/gpu_generate.py, each time-boxed so that the whole run ends within
# GPU_CHECK_SECONDS (default 540); a failed step does not stop the next. At most 8 files in $OUT:
#
#   summary.txt  install.log  gpu_tests.log  gpu_speed.log  gpu_speed.json
#   gpu_speed_compile.log  gpu_speed_compile.json  gpu_generate.log
#
# A GPU machine may reach no package registry. Then bring the packages as wheels: on a machine
# that can reach one, run `bash bench/gpu_check.sh --wheels` (fills .whl/, ignored by git, with
# the versions the venv holds, for CPython 3.12 on x86-64), and carry .whl/ along. Torch, numpy
# and the other packages the machine has are used as they are; only missing ones are installed,
# into /tmp/site, put first on PYTHONPATH.
set -u -o pipefail
cd "$(dirname "$0")/.."

# import name -> distribution: what the GPU tests and the benchmarks import beyond a PyTorch image.
# Not here: gradio (31 MB, over what a run can carry; tests/test_variation_seeds.py imports it and
# is reported as a collection error without it), open_clip, playwright, ray.
NEEDED="diffusers:diffusers k_diffusion:k-diffusion clip:clip-anytorch cleanfid:clean-fid dctorch:dctorch
jsonmerge:jsonmerge jsonschema:jsonschema jsonschema_specifications:jsonschema-specifications referencing:referencing
rpds:rpds-py torchsde:torchsde trampoline:trampoline ftfy:ftfy wcwidth:wcwidth lark:lark fastapi:fastapi
starlette:starlette pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types
typing_inspection:typing-inspection multipart:python-multipart sd_parsers:sd-parsers omegaconf:omegaconf
spandrel:spandrel spandrel_extra_arches:spandrel-extra-arches pkg_resources:setuptools"
WHEELS=${WHEEL_DIR:-.whl}

if [ "${1:-}" = "--wheels" ]; then
    PY=${PYTHON:-venv/bin/python}
    mkdir -p "$WHEELS"
    specs=()
    for pair in $NEEDED; do
        dist=${pair#*:}
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null) || version=""
        specs+=("$dist${version:+==$version}")
    done
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${specs[@]}"
fi

OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TQDM_DISABLE=1
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# The seconds a step may take: what it asks for, or what is left before the deadline.
box() {
    local left=$((DEADLINE - SECONDS - 5))
    echo $(($1 < left ? $1 : left))
}

step() {  # step NAME SECONDS LOG COMMAND...
    local name=$1 limit log=$3
    limit=$(box "$2")
    shift 3
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped, ${limit}s left before the deadline" | tee -a "$SUMMARY"
        return
    fi
    local started=$SECONDS
    echo "== $name (at most ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=$?
    local verdict="exit $status"
    [ "$status" -eq 124 ] && verdict="timed out after ${limit}s"
    echo "$name: $verdict in $((SECONDS - started))s" | tee -a "$SUMMARY"
}

missing_dists() {
    "$PY" - "$NEEDED" <<'EOF'
import importlib.util
import sys

for pair in sys.argv[1].split():
    module, dist = pair.split(":")
    if importlib.util.find_spec(module) is None:
        print(dist)
EOF
}

install() {
    echo "python: $(command -v "$PY"), $("$PY" -V 2>&1)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    local missing
    missing=$(missing_dists)
    if [ -z "$missing" ]; then
        echo "nothing missing"
    else
        echo "missing: $(echo $missing)"
        local wheels=() dist file
        for dist in $missing; do
            # Wheel file names spell the distribution with underscores, in any case.
            file=$(ls "$WHEELS"/*.whl 2>/dev/null | grep -i "/${dist//-/_}-[0-9]" | head -1)
            if [ -n "$file" ]; then wheels+=("$file"); else echo "no wheel in $WHEELS for $dist"; fi
        done
        if [ ${#wheels[@]} -gt 0 ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
                && echo "installed from $WHEELS into /tmp/site: ${wheels[*]##*/}"
        fi
        # Whatever is still missing, from a registry if one answers (quickly given up otherwise).
        local still
        still=$(missing_dists)
        if [ -n "$still" ]; then
            # At the versions requirements*.txt pin, where they pin one.
            local specs=() pin
            for dist in $still; do
                pin=$(grep -h -i -E "^${dist//[-_]/[-_]}==" requirements*.txt | head -1 | cut -d' ' -f1)
                specs+=("${pin:-$dist}")
            done
            "$PY" -m pip install -q --no-deps --no-cache-dir --retries 0 --timeout 5 --target /tmp/site "${specs[@]}" \
                && echo "installed from a registry: ${specs[*]}" || echo "could not install: ${specs[*]}"
        fi
    fi
    "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
}

# The tests a CPU run skips: those marked gpu or skipped, with a reason naming CUDA, without CUDA.
mkdir -p /tmp/gpu_check_plugin
cat >/tmp/gpu_check_plugin/gpu_only.py <<'EOF'
def _needs_cuda(item):
    if item.get_closest_marker("gpu") is not None:
        return True
    return any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _needs_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _needs_cuda(item)])
    items[:] = keep
EOF

mkdir -p /tmp/site
export PYTHONPATH="/tmp/site:/tmp/gpu_check_plugin${PYTHONPATH:+:$PYTHONPATH}"
export NEEDED WHEELS PY
export -f install missing_dists
step install 120 "$OUT/install.log" bash -c install
mapfile -t TEST_FILES < <(grep -l -E "cuda\.is_available|mark\.gpu" tests/test_*.py)
step gpu-tests 150 "$OUT/gpu_tests.log" "$PY" -m pytest -p gpu_only -p no:cacheprovider -rA --continue-on-collection-errors \
    "${TEST_FILES[@]}"
step gpu-speed 240 "$OUT/gpu_speed.log" "$PY" bench/gpu_speed.py --device cuda --json "$OUT/gpu_speed.json"
# Compiled, against plain diffusers in the same run: the goal is ours at 1.3x diffusers' it/s.
step gpu-speed-compile 240 "$OUT/gpu_speed_compile.log" "$PY" bench/gpu_speed.py --device cuda --repeats 2 \
    --sides diffusers,ours-compile-graphs,ours-compile --json "$OUT/gpu_speed_compile.json"
step gpu-generate 120 "$OUT/gpu_generate.log" "$PY" bench/gpu_generate.py
echo "done in ${SECONDS}s" | tee -a "$SUMMARY"
