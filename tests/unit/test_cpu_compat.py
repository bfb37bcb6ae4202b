"""The CPU patches: applied only without CUDA, and a no-op when CUDA is reported available."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import REPO_ROOT, worker_env


def _run_process(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=worker_env(env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _run(code: str) -> str:
    return _run_process(code).stdout


def test_no_patch_when_cuda_is_reported_available():
    out = _run("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron.core.tensor_parallel import random as mp_random
        before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Event,
                  mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state,
                  mp_random.CudaRNGStatesTracker.add)
        from megatron_opsd import cpu_compat
        from torch.overrides import _get_current_function_mode_stack
        assert cpu_compat.apply() is False
        after = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Event,
                 mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state,
                 mp_random.CudaRNGStatesTracker.add)
        assert before == after, "a patch was applied although CUDA is available"
        assert not _get_current_function_mode_stack(), "a torch function mode was entered"
        assert not cpu_compat.enabled()
        print("untouched")
    """)
    assert "untouched" in out


def test_patches_make_cuda_placements_land_on_cpu():
    out = _run("""
        import torch
        from megatron_opsd import cpu_compat
        assert cpu_compat.apply() is True
        x = torch.zeros(2, device=torch.cuda.current_device())
        y = torch.ones(2).cuda()
        z = torch.ones(2).to("cuda")
        w = torch.empty(3, device="cuda:0")
        assert {t.device.type for t in (x, y, z, w)} == {"cpu"}
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # megatron's optimizer type checks
        from megatron.core.tensor_parallel import random as mp_random
        mp_random.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        tracker = mp_random.get_cuda_rng_tracker()
        with tracker.fork():
            a = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork():
            b = torch.rand(3)
        assert not torch.equal(a, b), "the tracker state should advance between forks"
        print("ok")
    """)
    assert "ok" in out


def test_version_is_asserted(monkeypatch):
    from megatron_opsd import cpu_compat

    monkeypatch.setattr(cpu_compat, "SUPPORTED_MEGATRON_CORE", "0.0.1")
    import pytest

    with pytest.raises(RuntimeError, match="written for megatron-core 0.0.1"):
        cpu_compat.check_version()


def test_release_free_heap_gives_freed_tensor_pages_back():
    out = _run("""
        import torch
        from megatron_opsd import cpu_compat
        assert cpu_compat.apply() is True

        def rss_mib():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024

        big = torch.ones(16 << 20, dtype=torch.uint8)
        del big  # glibc raises its mmap threshold to 16 MiB: smaller tensors now live in the heap
        blocks = [torch.ones(1 << 18) for _ in range(256)]  # 256 x 1 MiB
        # a live block above them, so the heap's top cannot shrink by itself (a tiny one could be
        # served from a free list anywhere below, and free() would then trim the blocks itself)
        pin = torch.ones(1 << 16)
        del blocks
        before = rss_mib()
        cpu_compat.release_free_heap()
        print(before - rss_mib())
    """)
    assert int(out.split()[-1]) > 200  # MiB given back of the 256 freed


def test_placement_free_repeats_probe_then_leave_the_mode_and_fall_back_on_error():
    out = _run("""
        import torch
        from megatron_opsd import cpu_compat
        assert cpu_compat.apply() is True

        def mode_on():
            return cpu_compat._mode_is_active()

        # a function with no CUDA placement: probed once under the mode, then run without it
        free = cpu_compat.PlacementFreeRepeats(enabled=True)
        assert [free(mode_on) for _ in range(4)] == [True, False, False, False]
        assert free.calls_without_mode == 3 and cpu_compat._mode_is_active()  # the mode is back after each

        # one that places on CUDA: the probe sees it, every call keeps the mode
        placing = cpu_compat.PlacementFreeRepeats(enabled=True)
        assert [placing(lambda: (torch.zeros(1, device="cuda"), mode_on())[1]) for _ in range(3)] == [True] * 3
        assert placing.state == "off" and placing.calls_without_mode == 0

        # one that places on CUDA only later (a data-dependent branch): that call fails outside the mode,
        # is re-run under it, and so is every later call
        calls = []
        def late(i):
            calls.append(mode_on())
            return torch.zeros(1, device="cuda" if i >= 2 else "cpu").device.type
        late_free = cpu_compat.PlacementFreeRepeats(enabled=True)
        assert [late_free(late, i) for i in range(4)] == ["cpu"] * 4
        assert calls == [True, False, False, True, True], calls
        assert late_free.state == "off" and late_free.calls_without_mode == 1

        # disabled, or another torch-function mode on top: always under the mode
        off = cpu_compat.PlacementFreeRepeats(enabled=False)
        assert [off(mode_on) for _ in range(2)] == [True, True]
        from torch.overrides import TorchFunctionMode
        class Other(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        nested = cpu_compat.PlacementFreeRepeats(enabled=True)
        nested(mode_on)
        with Other():
            assert nested(mode_on) is True and nested.calls_without_mode == 0
        print("ok")
    """)
    assert "ok" in out


def test_megatron_functions_are_compiled_at_their_first_call_and_nothing_else_changes():
    """``defer_megatron_compile``: importing megatron-core after megatron_opsd imports no dynamo (the
    ~1.9 s it saves per process), and, with a stand-in for torch.compile, megatron's functions are
    compiled once, at their first call, with their options, while every other caller reaches it at once."""
    out = _run("""
        import sys
        import megatron_opsd  # applies the deferral
        import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing
        import megatron.core.activations
        print("dynamo imported:", "torch._dynamo" in sys.modules)
        print("is deferring:", getattr(megatron.core.jit.jit_fuser, "_defers_megatron", False))
    """)
    assert "dynamo imported: False" in out and "is deferring: True" in out, out

    from megatron_opsd import cpu_compat

    calls = []

    def real(model=None, **options):  # stands in for torch.compile: records and returns a doubling wrapper
        calls.append((model.__name__, options))
        return lambda *args: 2 * model(*args)

    compile = cpu_compat._deferring_compile(real)

    def megatron_fn(x):
        return x + 1

    def user_fn(x):
        return x + 1

    megatron_fn.__module__ = "megatron.core.fusions.fake"
    deferred = compile(megatron_fn)
    with_options = compile(fullgraph=True)(megatron_fn)
    assert calls == []  # nothing compiled at decoration
    assert deferred(1) == 4 and deferred(2) == 6 and with_options(1) == 4
    assert calls == [("megatron_fn", {}), ("megatron_fn", {"fullgraph": True})]  # once each, options kept
    assert compile(user_fn, mode="max-autotune")(1) == 4
    assert calls[-1] == ("user_fn", {"mode": "max-autotune"})  # at once: not deferred


def test_checkpoint_saves_start_no_interpreter():
    """``_patch_checkpoint_results_queue``: megatron's checkpoint writer collects results through a
    Manager queue it starts with "spawn" (a fresh interpreter re-importing torch and megatron-core:
    ~2.4 s at each process's first save); on CPU it is forked. A save and load round trip works with
    spawning made impossible."""
    out = _run("""
        import multiprocessing, tempfile
        import torch
        from megatron_opsd.parallel import ParallelConfig, init_parallel
        runtime = init_parallel(ParallelConfig(), seed=0)  # applies the CPU patches

        def refuse(self):
            raise AssertionError("a process was spawned")
        multiprocessing.get_context("spawn").Process.start = refuse
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor
        directory = tempfile.mkdtemp()
        weight = torch.arange(12.0).view(3, 4)
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, directory)
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)},
                                         directory)
        print("round trip:", torch.equal(loaded["w"], weight))
        runtime.destroy()
    """)
    assert "round trip: True" in out, out


def test_cpu_runs_print_none_of_the_warnings_cpu_compat_silences():
    """megatron's "Transformer Engine and Apex are not installed" warnings (emitted as its optimizer and
    fusion modules are imported), torch's fp32-norm-weight "Mismatch dtype" warning of a bf16 model and
    torch's ShardedTensor deprecation at a checkpoint load (named after cpu_compat's placement mode):
    the filters are in place before anything that warns runs (the TE/Apex filter used to come after
    the import that warns, so every process printed four of them)."""
    proc = _run_process("""
        import torch
        from megatron_opsd.parallel import ParallelConfig, init_parallel
        runtime = init_parallel(ParallelConfig(), seed=0)
        import megatron.core.optimizer  # warns at import without TE/Apex
        weight = torch.ones(8)  # fp32, as a bf16 model's norm weight
        torch.nn.functional.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), (8,), weight, 1e-5)
        # what torch's checkpoint planner does with the torch ShardedTensors megatron's loader hands it
        from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
        sharded = init_from_local_shards([Shard.from_tensor_and_offsets(torch.ones(4), [0], rank=0)], 4)
        getattr(sharded, "device", None)
        runtime.destroy()
        print("done")
    """, env={"PYTHONWARNINGS": "default"})
    assert "done" in proc.stdout, proc.stderr[-3000:]
    for silenced in ("not installed", "Mismatch dtype", "deprecating ShardedTensor"):
        assert silenced not in proc.stderr, proc.stderr[-3000:]
