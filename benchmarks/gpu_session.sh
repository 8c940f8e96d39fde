#!/usr/bin/env bash
# gpu_session.sh: the one command to run on a fresh CUDA machine (H100/H200) for lora_engine's Triton kernels.
#
#   cd <lora_engine checkout> && bash benchmarks/gpu_session.sh
#
# Writes benchmarks/results/gpu-<UTC date>/ (commit it): session.log, kernel_tests.txt, checks.txt and one
# bench-<phase>/ folder of JSON + PNGs per bench phase. Assumes python3 with CUDA torch + triton, peft,
# bitsandbytes (CUDA), pytest and matplotlib installed, no network; installs lora_engine itself (editable,
# --no-deps) if it is not importable. Python runs with PYTHONSAFEPATH=1: the project root on sys.path would let
# our kernels/ folder shadow Hugging Face's `kernels` package. Budget: under 8 minutes on an H200; every phase
# runs under `timeout`, so a slow phase costs only its own budget and the summary always prints. The budgets are
# estimates (never run on a GPU yet: the first session tells):
#   1. environment (GPU, versions), editable install if needed                                      ~15 s
#   2. tests/kernel_ops on CUDA tensors, compiled kernels, never the interpreter
#      (benchmarks/kernel_tests_on_cuda.py swaps the tests' interpreter fixture; the offline sm_90a
#      compile check is left to CI)                                                          budget 110 s
#   3. checks on CUDA beyond the tests: each strategy (fused, cublas) forward and every gradient vs the reference at
#      N=8192 4096->4096 r=16 bf16, dropout 0 and 0.1; saved mask == reference's bit for bit; backward bitwise
#      equal twice; what `auto` chose; a CUDA-graph replay of a dropout forward draws a fresh mask   budget 90 s
#   4. lora-engine bench --device cuda --quick, each case with its roofline and (dense layers) auto's strategy:
#      a. lora_linear: ours vs peft vs frozen base at 2048/8192 tokens, dropout 0.1, ranks 16/64 budget 110 s
#      b. qlora, decode, merge: QLoRA layer fwd(+bwd) and a 4-layer 7B-shaped Llama QLoRA step vs peft+bnb,
#         dense and NF4 decode at batch 1/4/16, dense and 4-bit merge+unmerge                  budget 80 s
#      c. mixed_batch, memory: mixed batches of 1/4/8/16/64 adapters; live memory after a mixed batch and after
#         deleting 99 of 100 adapters (issue 17's targets)                                          budget 60 s
#   Total of the budgets: 465 s. A bench phase past its budget gets SIGTERM: it prints and writes what it measured.
set -uo pipefail

ROOT="$(pwd)"
if [ ! -f "$ROOT/pyproject.toml" ] || [ ! -d "$ROOT/kernels" ]; then
    echo "gpu_session.sh: run from the lora_engine project root" >&2
    exit 2
fi
PY="${PYTHON:-python3}"
OUT="$ROOT/benchmarks/results/gpu-$(date -u +%Y-%m-%d-%H%M)"
mkdir -p "$OUT"
unset TRITON_INTERPRET LORA_ENGINE_BACKEND LORA_ENGINE_LORA_GEMM LORA_ENGINE_NF4_GEMM
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/.triton_cache}"
START=$(date +%s)
say() { echo "=== [$(( $(date +%s) - START ))s] $*"; }
exec > >(tee -a "$OUT/session.log") 2>&1

say "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if ! "$PY" -c "import lora_engine.kernels.lora_linear, lora_engine.bench.cli" 2>/dev/null; then
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e "$ROOT" || echo "editable install failed"
fi

say "2. tests/kernel_ops on CUDA (compiled kernels, no interpreter)"
(PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" timeout 110 "$PY" -m pytest \
    -p kernel_tests_on_cuda tests/kernel_ops --ignore=tests/kernel_ops/test_kernels_compile_for_h100.py \
    -q -p no:cacheprovider -rf 2>&1 | tail -40 | tee "$OUT/kernel_tests.txt") || true

say "3. checks on CUDA (compiled kernels)"
timeout 90 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/checks.txt"
import os, torch
from lora_engine.ops.lora_linear import draw_seed, reference_lora_linear, triton_lora_linear
from lora_engine.reference import lora_linear as reference
from lora_engine.kernels import lora_linear as kernel, strategy

failures = []
def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""))
    if not ok:
        failures.append(name)

def operands(n, d_in, d_out, r, dtype, gen):
    x = torch.randn(n, d_in, generator=gen, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=gen, device="cuda") * d_in**-0.5).to(dtype)
    b = torch.randn(d_out, generator=gen, device="cuda").to(dtype)
    a = (torch.randn(r, d_in, generator=gen, device="cuda") * d_in**-0.5).requires_grad_()
    bb = (torch.randn(d_out, r, generator=gen, device="cuda") * r**-0.5).requires_grad_()
    return x, w, b, a, bb

def grads(fn, ops, seed):
    out = fn(*ops, 0.5, p, seed, False)
    gy = torch.randn_like(out)
    return (out, *torch.autograd.grad(out, [ops[0], ops[3], ops[4]], gy))

gen = torch.Generator(device="cuda").manual_seed(0)
for shape in [(37, 45, 29, 3), (8192, 4096, 4096, 16)]:  # the odd shape: tests/kernel_ops covers more
    for p in (0.0, 0.1):
        ops = operands(*shape, torch.bfloat16, gen)
        seed = draw_seed(torch.device("cuda"))
        want = grads(reference_lora_linear, ops, seed)
        for forced in ("fused", "cublas"):
            os.environ[strategy.ENV_VAR] = forced
            got = grads(triton_lora_linear, ops, seed)
            again = grads(triton_lora_linear, ops, seed)
            errors = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1)).item() for g, w in zip(got, want)]
            check(f"{forced} {shape} p={p} vs reference (max rel err y, dx, dA, dB)", max(errors) < 3e-2, [f"{e:.1e}" for e in errors])
            check(f"{forced} {shape} p={p} backward bitwise equal twice", all(torch.equal(a, b) for a, b in zip(got[1:], again[1:])))
        os.environ.pop(strategy.ENV_VAR)
        if p:
            x, w, b, a, bb = ops
            _, _, bits = kernel.forward(x.detach(), w, b, a.detach(), bb.detach(), 0.5, p, seed, False)
            want_bits = reference.keep_bits(seed, x.shape[0], x.shape[1], p)
            check(f"{shape} saved mask == reference's bit for bit", torch.equal(bits, want_bits))
    triton_lora_linear(*ops, 0.5, 0.0, None, False)  # auto
print("auto chose:", strategy.chosen())

x = torch.ones(64, 256, device="cuda"); eye = torch.eye(256, device="cuda")
from lora_engine.ops.lora_linear import lora_linear
static = lora_linear(x, None, None, eye, eye, 1.0, dropout_p=0.5)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static = lora_linear(x, None, None, eye, eye, 1.0, dropout_p=0.5)
graph.replay(); first = static.clone(); graph.replay()
check("CUDA-graph replay draws a fresh dropout mask", not torch.equal(first == 0, static == 0))
print("FAILED:", failures if failures else "none")
PYEOF

bench() {  # bench <phase name> <seconds> <families>
    say "4$1. lora-engine bench --device cuda --quick --only $3 (budget $2 s)"
    # SIGTERM at the budget: the bench stops, prints and writes what it measured; KILL 30 s later if it cannot.
    timeout -k 30 "$2" "$PY" -m lora_engine bench --device cuda --quick --only "$3" --out "$OUT/bench-$1" \
        || echo "bench $1 exited $?"
}
bench a 110 lora_linear
bench b 80 qlora,decode,merge
bench c 60 mixed_batch,memory

say "done: results in $OUT"
rm -rf "$OUT/.triton_cache"
