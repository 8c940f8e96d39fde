"""Memory, measured two ways.

- **Saved for backward**: the unique bytes of storage autograd keeps from a forward for its backward, seen
  through ``torch.autograd.graph.saved_tensors_hooks``. Each storage counts once however many tensors view it
  (``x`` saved by q, k and v projections counts once); parameters never count (they exist anyway). Exact and the
  same on every device.
- **Live**: the bytes of every tensor alive now. On CUDA ``memory_allocated``; on the CPU the distinct storages of
  every tensor the garbage collector can see (so a cache anywhere counts). Only differences between two such
  readings mean something: other objects of the process count too.
- **Peak**: the most memory one call holds above what was held before it. On CUDA ``max_memory_allocated``
  around the call, in this process. On the CPU the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs``) of a child process that builds the one implementation alone, with glibc told to
  serve every allocation over 64 KiB by ``mmap`` so that freed tensors leave the resident set at once: the
  median of three such children. Children fork from a server that imported torch, transformers and peft once,
  so each costs a fraction of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora_engine.bench.case import Case, Runner, build_runner

#: How long one child may take to build and run a case, in seconds.
CHILD_TIMEOUT_S = 600
#: Children whose median is a CPU peak (``cpu_peak_rss_bytes``).
PEAK_CHILDREN = 3
#: glibc's ``mallopt`` parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Imported once by the fork server, so that no child pays for them (transformers and peft import lazily).
_PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "peft.tuners.lora",
    "bitsandbytes",
    "safetensors.torch",
    "lora_engine",
    "lora_engine.layers.bnb",
    "lora_engine.bench.suite",
]


def saved_tensor_bytes(
    forward: Callable[[], object],
    parameters: Sequence[torch.Tensor] = (),
    scope: Sequence[nn.Module] | None = None,
) -> int:
    """Unique bytes of storage saved for backward while ``forward()`` runs (its result is dropped after).

    ``scope``: count only tensors saved while inside one of these modules' forward; None counts all.
    Storages of ``parameters`` are never counted.
    """
    excluded = {param.untyped_storage().data_ptr() for param in parameters}
    saved: dict[int, int] = {}
    depth = [0 if scope is not None else 1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if depth[0] > 0:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded and storage.nbytes() > 0:
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with contextlib.ExitStack() as stack:
        for module in scope or ():
            stack.callback(module.register_forward_pre_hook(lambda *_: _step(depth, +1)).remove)
            stack.callback(module.register_forward_hook(lambda *_: _step(depth, -1)).remove)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
        del output
    return sum(saved.values())


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of live tensors on ``device`` after a full collection (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    from torch._subclasses.fake_tensor import FakeTensor

    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some of torch's lazy module attributes warns
        tensors = [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor)
            and obj.device.type == device.type
            and not isinstance(obj, FakeTensor)
        ]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _step(depth: list[int], delta: int) -> None:
    depth[0] += delta


def cuda_peak_bytes(runner: Runner, device: torch.device) -> int:
    """Peak CUDA memory allocated during one call above what was allocated before it."""
    if runner.reset is not None:
        runner.reset()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    output = runner.run()
    torch.cuda.synchronize(device)
    del output
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_rss_bytes(case: Case, impl: str) -> int | None:
    """Peak RSS of one call of ``impl`` on ``case`` above the RSS before it: the median over ``PEAK_CHILDREN``
    child processes, each measuring one call.

    One child's figure moves by ±0.2 MiB around a 5.8 MiB peak from run to run (measured: a mixed batch of the
    bench Llama, eight children per implementation), both ways: enough to turn a 1.00 ratio into 0.96 or 1.04.
    The median of three keeps one stray run out of the ratio.

    None where it cannot be measured (no ``/proc/self/clear_refs``, i.e. not Linux) or a child failed; a
    failure is reported as a warning.
    """
    if not _peak_rss_resettable():
        return None
    peaks = []
    for _ in range(PEAK_CHILDREN):
        peak = _child_peak_rss_bytes(case, impl)
        if peak is None:
            return None
        peaks.append(peak)
    return sorted(peaks)[len(peaks) // 2]


def _child_peak_rss_bytes(case: Case, impl: str) -> int | None:
    """One child's peak RSS of one call of ``impl`` on ``case`` (None, with a warning, if the child failed)."""
    context = _child_context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, case, impl), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(CHILD_TIMEOUT_S):
            warnings.warn(f"peak RSS of {impl} on {case.key}: no answer in {CHILD_TIMEOUT_S} s", stacklevel=2)
            return None
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", f"the child process died (exit code {child.exitcode})"
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    if status != "ok":
        warnings.warn(f"peak RSS of {impl} on {case.key} not measured: {value}", stacklevel=2)
        return None
    return value


_context: multiprocessing.context.BaseContext | None = None


def _child_context() -> multiprocessing.context.BaseContext:
    """The fork server's context, the server started. forkserver, not fork: forking a process whose OpenMP pool
    has run can hang the child."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        # The server runs ``python -c``, which puts the working directory first on sys.path: started from the
        # repository root, our ``kernels/`` folder would shadow the top-level ``kernels`` package that
        # bitsandbytes and transformers probe. PYTHONSAFEPATH (Python 3.11+) leaves it off.
        previous = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if previous is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = previous
        _context = context
    return _context


def _child_main(sender, case: Case, impl: str) -> None:
    try:
        sender.send(("ok", _measure_peak_rss(case, impl)))
    except BaseException as error:  # reported to the parent, which carries on with the other cases
        sender.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        sender.close()


def _measure_peak_rss(case: Case, impl: str) -> int:
    warnings.simplefilter("ignore")  # the parent already showed whatever building this case warns about
    gc.freeze()  # the preloaded libraries: out of the collection below
    _serve_large_allocations_by_mmap()
    runner = build_runner(case, impl, torch.device("cpu"))
    for _ in range(2):  # the first call sets up lazily allocated state (thread pools, optimizer moments)
        if runner.reset is not None:
            runner.reset()
        output = runner.run()
        del output
    if runner.reset is not None:
        runner.reset()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    output = runner.run()
    peak = _status_bytes("VmHWM")
    del output
    runner.close()
    return peak - before


def _serve_large_allocations_by_mmap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_resettable() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")
