"""Make megatron-core 0.16.1 run on CPU (gloo), applied only when CUDA is absent.

megatron-core assumes CUDA in a handful of places (placements, RNG tracker, optimizer type checks,
synchronisation, timing events). Each patch below says why it exists. Nothing here runs when
``torch.cuda.is_available()``: on GPU clusters megatron-core is used untouched.

These patches touch private names: they are written for exactly ``SUPPORTED_MEGATRON_CORE`` and the
CPU test suite must be re-run on any upgrade.

One patch acts at import, before megatron-core is imported: ``defer_megatron_compile`` (called by
``megatron_opsd/__init__.py`` on torch builds without CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.16.1"

_applied = False
_mode: "_CudaToCpuMode | None" = None
_rewrites = 0  # CUDA placements the mode has rewritten so far (``PlacementFreeRepeats`` probes with it)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # torch.cuda.current_device() returns an int index
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU in every torch call made while it is active.

    Why: megatron-core places tensors with ``device=torch.cuda.current_device()``, ``device="cuda"``,
    ``.cuda()`` and ``.to("cuda")`` in ~80 places (rotary embedding, buffers, schedules' token
    counters, p2p, optimizer, KV cache). It also answers ``Tensor.type()`` with the CUDA type name,
    because megatron's optimizers accept fp32 params only if ``param.type() == 'torch.cuda.FloatTensor'``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        global _rewrites
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            _rewrites += 1
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            _rewrites += 1
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _rewrites += 1
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            _rewrites += 1
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """Why: the inference controller times steps with ``torch.cuda.Event`` (timing only)."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, *args, **kwargs):
        import time

        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._time - self._time) * 1000.0


class _CpuStream:
    """Why: megatron's alltoall MoE token dispatcher creates a ``torch.cuda.Stream`` for its
    device-to-host copies of the split sizes and waits on an event recorded there. On CPU there is
    nothing to overlap: one stream, events that are already complete."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return _CpuEvent()


_CPU_STREAM = _CpuStream()


def check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_opsd.cpu_compat was written for megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"found {found}: pin megatron-core=={SUPPORTED_MEGATRON_CORE} (requirements/constraints.txt) "
            "or re-verify the CPU patches against the new release."
        )


def _patch_rng_tracker() -> None:
    """Why: the tensor-parallel RNG tracker stores and swaps CUDA generator states.

    On CPU the "device" generator is the CPU default generator, so the tracker stores CPU states.
    """
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    mp_random.CudaRNGStatesTracker.add = add


def defer_megatron_compile() -> None:
    """Why: megatron-core decorates ~40 fusion functions with ``torch.compile`` (``megatron.core.jit``'s
    ``jit_fuser``) as its modules are imported, and ``torch.compile`` imports dynamo and inductor: ~1.9 s
    of the start of every process that imports megatron-core on this machine (a worker, a tool; a
    python -X importtime of megatron's GPT model, optimizer and dist_checkpointing: 4.7 s, 2.8 s with
    this), while none of those fusions runs on our CPU path (``models/provider.py`` switches the
    fusions off without CUDA). Here functions defined in ``megatron.core`` are handed to
    ``torch.compile`` at their first call instead; torch.compile compiles at the first call anyway, so
    only the import moves. Every other ``torch.compile`` call goes straight through. Applied once, at
    ``import megatron_opsd``, on torch builds without CUDA only (``torch.cuda.is_available()`` is not
    asked at import: on a CUDA build it would initialise the driver before any fork)."""
    if torch.backends.cuda.is_built() or getattr(torch.compile, "_defers_megatron", False):
        return
    torch.compile = _deferring_compile(torch.compile)


def _deferring_compile(real):
    """``torch.compile`` that defers the compilation of megatron-core's functions to their first call."""

    @functools.wraps(real)
    def compile(model=None, **options):
        if model is None:  # @torch.compile(...) with options
            return functools.partial(compile, **options)
        if not (inspect.isfunction(model) and model.__module__.startswith("megatron.core")):
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    compile._defers_megatron = True
    return compile


def _define_missing_te_names() -> None:
    """Why (GPU too, whenever Transformer Engine is absent): megatron-core 0.16.1's MoE router gating
    (``moe_utils.RouterGatingLinearFunction``) tests ``te_general_gemm is not None``, a name only
    bound when the TE import succeeds: NameError on every MoE forward without TE. Binding it to None
    selects the torch matmul path that was meant."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_dispatcher() -> None:
    """Why: the alltoall MoE token dispatcher (1) creates a ``torch.cuda.Stream`` for device-to-host
    copies of the split sizes and (2) gets them back as numpy arrays only when they were on the GPU
    (``maybe_move_tensor_to_cpu``); CPU tensors stay tensors, which ``all_to_all_single`` refuses as
    split sizes. On CPU: one pseudo-stream, and CPU split sizes converted as the GPU path converts them."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CPU_STREAM  # (torch.cuda.Stream: a type)
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _patch_single_rank_buffer_collectives() -> None:
    """Why: megatron's DDP reduces the gradient buffer with ``reduce_scatter_tensor`` and (distributed
    optimizer) gathers the parameter buffer with ``all_gather_into_tensor``, and gloo carries out both
    through a whole-buffer temporary: a clone of the fp32 gradient buffer (308 MiB for an 80M-parameter
    model) and a parameter-buffer-sized gather output, each live at a peak of the step. On a group of
    one rank both collectives are the identity (megatron passes the buffer and its one shard, a view of
    the same memory), so there they are skipped; groups of several ranks are unchanged."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer as buffers

    def skip_on_one_rank(collective):
        @functools.wraps(collective)
        def wrapper(output, input_, *args, group=None, **kwargs):
            if dist.get_world_size(group) != 1:
                return collective(output, input_, *args, group=group, **kwargs)
            if output.data_ptr() != input_.data_ptr() or output.numel() != input_.numel():
                output.copy_(input_.view_as(output))
            return None  # megatron keeps the coalescing manager as the handle, not this value

        return wrapper

    buffers.dist_reduce_scatter_func = skip_on_one_rank(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = skip_on_one_rank(buffers.dist_all_gather_func)


def _patch_checkpoint_results_queue() -> None:
    """Why: megatron's checkpoint writer (``FileSystemWriterAsync``) collects its writer processes'
    results through a ``multiprocessing`` Manager queue, made once per process at its first save with
    the "spawn" start method, because forking a process that has initialised CUDA is unsafe. A spawned
    process re-imports the main module (torch, megatron-core, ours): ~2.4 s at the first save of every
    training process, tool or test worker on this machine (cProfile of a one-step run: 2.4 s of its
    2.8 s save). Without CUDA forking is safe, as megatron's own writer processes (forked) rely on,
    and the same Manager queue starts in a fraction of a second."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def results_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = results_queue


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or not Linux)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (CPU only; a no-op on GPU or without glibc).

    Why: on CPU tensors below glibc's mmap threshold (which grows to 32 MiB as large blocks are freed)
    live in the C heap, and the pages of freed ones stay resident: after a forward pass ~0.1 GiB of
    them at the OPSD step's size (``benchmarks/vs_trl.py``), which the loss's buffers, allocated on top,
    turn into peak memory. ``malloc_trim`` returns them; it costs a few milliseconds."""
    trim = _malloc_trim() if _applied else None
    if trim is not None:
        trim(0)


def embedding_grads_into_main_grad(ddp_chunks) -> None:
    """Why: megatron's ``VocabParallelEmbedding`` differentiates through ``F.embedding``, whose CPU
    backward builds a dense [V, H] gradient (74 MiB bf16 / 148 MiB fp32 at V=151,936, H=256) for a
    micro-batch that touches a few thousand rows, and megatron's DDP hook then adds it to ``main_grad``
    (for a bf16 weight through a mixed-dtype ``add_`` that first makes a 148 MiB fp32 copy): the top
    of the step's backward. A marked weight's lookup (``_EmbeddingDispatch``) instead adds the rows of
    the micro-batch's ids straight into ``main_grad`` (``index_add_`` in its dtype) and hands autograd
    an untouched placeholder, flagged ``grad_added_to_main_grad`` so megatron's hook adds nothing, as
    after its own fused linears (the flag is megatron's, reset with the gradient buffer). Skipped for an
    embedding tied to the output layer on this stage (``zero_out_wgrad``: megatron's hook adds the sum
    of both uses). CPU only; a no-op without this module's patches. Marking twice is harmless (the
    embedded default's warm-up wraps the same chunks before the trainer does)."""
    if not _applied:
        return
    for chunk in ddp_chunks:
        embedding = getattr(chunk.module, "embedding", None)
        weight = None if embedding is None else embedding.word_embeddings.weight
        if (weight is not None and weight.requires_grad and getattr(weight, "main_grad", None) is not None
                and hasattr(weight, "grad_added_to_main_grad") and not getattr(weight, "zero_out_wgrad", False)):
            weight._embedding_into_main_grad = True


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    """``F.embedding`` whose weight gradient goes into ``main_grad`` row by row (see above)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,), weight = ctx.saved_tensors, ctx.weight
        main_grad = weight.main_grad
        main_grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype))
        weight.grad_added_to_main_grad = True
        # never read (megatron's hook sees the flag); its pages are never touched, so never resident
        return None, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


class _EmbeddingDispatch:
    """Stands in for ``torch.nn.functional`` inside megatron's ``tensor_parallel.layers``: ``embedding``
    on a weight marked by ``embedding_grads_into_main_grad`` (under autograd) goes through
    ``_EmbeddingIntoMainGrad``; every other name is torch's own."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def embedding(input, weight, *args, **kwargs):
        if (getattr(weight, "_embedding_into_main_grad", False) and not args and not kwargs
                and torch.is_grad_enabled() and weight.requires_grad):
            return _EmbeddingIntoMainGrad.apply(input, weight)
        return torch.nn.functional.embedding(input, weight, *args, **kwargs)


def _patch_embedding_functional() -> None:
    from megatron.core.tensor_parallel import layers

    layers.F = _EmbeddingDispatch()


def enabled() -> bool:
    return _applied


def apply() -> bool:
    """Apply the CPU patches once if CUDA is absent. Returns whether they are active."""
    global _applied, _mode
    if _applied:
        return True
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # Why: on a CPU machine megatron's "Apex / Transformer Engine not installed, falling back" warnings
        # (one per module that looks for them, in every process) say nothing actionable. Only these are
        # silenced, only here: on GPU machines they point at a missing fused kernel and stay visible.
        # Before the next line, which imports modules that warn.
        warnings.filterwarnings("ignore", message=r"\s*(Apex is not installed|Transformer Engine and Apex are not "
                                r"installed)", category=UserWarning)
        # Why: a bf16 model keeps its RMSNorm weights in fp32 (megatron's local norm ignores params_dtype; see
        # the README's Conversion section), and torch then warns that it "cannot dispatch to fused
        # implementation". On CPU its composite path costs the same (bf16 [2048, 576]: 7.3 vs 7.2 ms) and
        # returns bf16; on GPUs the fused kernel matters and the warning stays visible.
        warnings.filterwarnings("ignore", message=r"Mismatch dtype between input and weight", category=UserWarning)
        # Why: megatron-core 0.16.1's checkpoint loader calls torch functions on torch ShardedTensors, whose
        # ``__torch_function__`` torch deprecates; the placement mode below passes those calls on, so the
        # warning names this file, as if our code used ShardedTensors. Nothing here can change it.
        warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor",
                                category=FutureWarning)
    _define_missing_te_names()
    if on_gpu:
        return False
    check_version()
    # Why: the placement mode below sees every torch call, including autograd's look at ``.grad`` of
    # non-leaf tensors, which then warns (once per process) about a read nobody made on purpose.
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf",
                            category=UserWarning)
    # Why: megatron calls these unconditionally; on a CPU build they raise "not compiled with CUDA".
    torch.cuda.current_device = lambda: 0  # an index; the mode below maps it to CPU
    torch.cuda.synchronize = lambda *a, **k: None  # p2p batching, checkpoint save
    torch.cuda.Event = _CpuEvent
    _patch_moe_dispatcher()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    _patch_rng_tracker()
    _patch_single_rank_buffer_collectives()
    _patch_checkpoint_results_queue()
    _patch_embedding_functional()
    _mode = _CudaToCpuMode()
    _mode.__enter__()  # stays active for the process lifetime
    _applied = True
    return True


def cpu_placement(fn):
    """Re-enter the CPU placement mode inside ``fn`` (no-op on GPU).

    Why: autograd runs backward with torch-function modes disabled, so code that megatron runs
    during backward (activation recompute's re-forward) would otherwise see raw CUDA placements.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with placement_context():
            return fn(*args, **kwargs)

    return wrapper


def placement_context():
    if _applied and not _mode_is_active():
        return _CudaToCpuMode()
    return contextlib.nullcontext()


class PlacementFreeRepeats:
    """Runs a function called many times with the same code path (a decode step) outside the placement
    mode, once one call under the mode has shown that it places nothing on CUDA.

    Why: the mode's Python handler sees every torch call, attribute reads included (thousands per decode
    step; ``benchmarks/rollout.py`` prints the engine with and without this). A decode step of a
    single-rank dense model makes no CUDA placement at all (megatron's ones are in setup, collectives
    and the MoE dispatcher). The first call (the probe) runs under the mode and counts the
    placements it rewrites; with none, later calls run without the mode. If one of them raises anyway
    (a data-dependent branch that places on CUDA), it is re-run under the mode, and so are all later
    calls: ``fn`` must be safe to re-run after a partial call (a decode step is: it rewrites the same
    cache slots), and the caller enables this only where no other rank waits on a collective inside it.
    Inactive (``fn`` called as is) on GPU, when disabled, or while another torch-function mode is active
    besides the placement mode."""

    def __init__(self, enabled: bool) -> None:
        self.state = "probe" if enabled and _applied else "off"
        self.calls_without_mode = 0

    def __call__(self, fn, *args, **kwargs):
        from torch.overrides import _pop_mode_temporarily

        if self.state == "probe":
            before = _rewrites
            out = fn(*args, **kwargs)
            self.state = "free" if _rewrites == before else "off"
            return out
        if self.state == "free" and _only_placement_mode_active():
            try:
                with _pop_mode_temporarily():
                    out = fn(*args, **kwargs)
            except Exception:
                self.state = "off"
                return fn(*args, **kwargs)
            self.calls_without_mode += 1
            return out
        return fn(*args, **kwargs)


def _only_placement_mode_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    return len(stack) == 1 and isinstance(stack[0], _CudaToCpuMode)


def _mode_is_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(m, _CudaToCpuMode) for m in _get_current_function_mode_stack())
