#!/usr/bin/env bash
# gpu_session.sh: the one command to run on a fresh CUDA machine (H100/H200) for lora_engine's Triton kernels.
#
#   cd <lora_engine checkout> && bash benchmarks/gpu_session.sh
#
# Writes benchmarks/results/gpu-<UTC date>/ (commit it): session.log, checks.txt and the bench's JSON/PNGs.
# Assumes python3 with CUDA torch + triton, peft and matplotlib installed, no network. Budget: under 8 minutes,
# each phase under `timeout` so the summary always prints:
#   1. environment (GPU, versions), ~5 s;
#   2. checks on CUDA tensors, compiled kernels (never the interpreter), ~2 min: for each strategy (fused, cublas)
#      forward and every gradient vs the reference at odd shapes and at N=8192 4096->4096 r=16 bf16, dropout 0
#      and 0.1; the saved mask bit for bit equal to the reference's; backward bitwise equal twice; what `auto`
#      chose; a CUDA-graph replay of a dropout forward draws a fresh mask;
#   3. lora-engine bench --device cuda --quick --only lora_linear (ours vs peft vs frozen base), ~4 min.
# Not yet covered here (see the issue-12 report): running tests/kernel_ops itself on CUDA tensors.
set -uo pipefail

ROOT="$(pwd)"
if [ ! -f "$ROOT/pyproject.toml" ] || [ ! -d "$ROOT/kernels" ]; then
    echo "gpu_session.sh: run from the lora_engine project root" >&2
    exit 2
fi
PY="${PYTHON:-python3}"
OUT="$ROOT/benchmarks/results/gpu-$(date -u +%Y-%m-%d-%H%M)"
mkdir -p "$OUT"
unset TRITON_INTERPRET LORA_ENGINE_BACKEND LORA_ENGINE_LORA_GEMM
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/.triton_cache}"
START=$(date +%s)
say() { echo "=== [$(( $(date +%s) - START ))s] $*"; }
exec > >(tee -a "$OUT/session.log") 2>&1

say "1. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

say "2. checks on CUDA (compiled kernels)"
timeout 180 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/checks.txt"
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
for shape in [(37, 45, 29, 3), (8192, 4096, 4096, 16)]:
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

say "3. lora-engine bench --device cuda --quick --only lora_linear"
timeout 270 lora-engine bench --device cuda --quick --only lora_linear --out "$OUT" || echo "bench exited $?"

say "done: results in $OUT"
rm -rf "$OUT/.triton_cache"
