#!/usr/bin/env bash
# The training benchmark on a lent GPU machine, in one call; results land in $OUT (or bench/results/).
#
#   Prepare here, once (see bench/README.md):
#     .venv/bin/python bench/train.py --vendor --diffusers-git DIR    # the official script → bench/vendor/
#     .venv/bin/python bench/train.py --pack                          # diffusers, bitsandbytes, deepspeed → bench/wheels/
#   Then, through the device tool:
#     run(command="bash bench/gpu_session.sh", carry=["bench/vendor", "bench/wheels"], timeout_s=570)
#   Arguments go on to bench/train.py, e.g. `bash bench/gpu_session.sh --configs official-classic,ours-classic`.
#
# The GPU image has torch, transformers, accelerate, peft, typer, rich and safetensors, but no diffusers,
# bitsandbytes or DeepSpeed, and no network: the carried wheels are installed with --no-deps into a folder put on
# PYTHONPATH.
# BENCH_BUDGET_S (default 420 s) bounds the harness: it starts no run that would not fit, so the whole call ends
# well inside one command's 10 minutes and a session's 15 device-minutes leave room to look at the result.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-bench/results}
BUDGET_S=${BENCH_BUDGET_S:-420}
PY=${PYTHON:-python3}
read -r -a PIP <<<"${PIP:-$PY -m pip}"
SITE=${BENCH_SITE:-/tmp/bench-site}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

session() {
    echo "== $(date -u +%FT%TZ) bench/gpu_session.sh $*"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv || true
    if compgen -G "bench/wheels/*.whl" >/dev/null; then
        "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            bench/wheels/*.whl || { echo "error: installing bench/wheels/*.whl failed"; return 3; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # DeepSpeed is published as source only: built there against that machine's torch (pure Python, no kernels)
    if compgen -G "bench/wheels/*.tar.gz" >/dev/null; then
        DS_BUILD_OPS=0 "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
            --target "$SITE" bench/wheels/*.tar.gz || echo "warning: building bench/wheels/*.tar.gz failed"
    fi
    "$PY" - <<'EOF' || return 3
import importlib.metadata as m, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, gpu {torch.cuda.is_available()}")
for p in ("diffusers", "transformers", "accelerate", "bitsandbytes", "deepspeed", "huggingface-hub"):
    try:
        print(f"{p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"{p} MISSING")
import diffusers  # noqa: F401  (fails here, clearly, rather than in every run)
EOF
    ls bench/vendor/*/train_dreambooth.py 2>/dev/null || echo "warning: no official script in bench/vendor/ (not carried?)"
    # `timeout` only as a last guard: the harness keeps to its budget by itself
    timeout --signal=INT --kill-after=30 $((BUDGET_S + 120)) "$PY" bench/train.py --budget-s "$BUDGET_S" \
        --work-dir /tmp/bench-train --results-dir "$OUT" "$@"
}

session "$@" 2>&1 | tee "$OUT/gpu-session.log"
