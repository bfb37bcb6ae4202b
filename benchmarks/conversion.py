"""Wall time and peak memory of HF <-> megatron conversion for a Qwen2.5-0.5B-shaped model.

    python benchmarks/conversion.py                 # Qwen2.5-0.5B shapes, bf16, 300MB shards
    python benchmarks/conversion.py --quick         # a small smoke run

A random model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151936, tied embeddings, qkv bias) is written as bf16 safetensors, sharded with an index:
names and shapes come from transformers' own Qwen2ForCausalLM (built on the meta device), values are
drawn tensor by tensor. Then, each in a fresh process (the command-line tools):

  hf -> megatron     tools/convert_hf_to_megatron.py --dtype bf16
  megatron -> hf     tools/convert_megatron_to_hf.py
  idle baseline      a process that only imports what the converters import (torch, megatron-core)

Peak memory: ``ru_maxrss`` of the tool's process (from ``wait4``), and the peak over time of the
summed PSS of its process tree (sampled every 50 ms; dist_checkpointing forks writer processes, PSS
splits pages they share with the parent). Model bytes: the bf16 weights (the HF checkpoint size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
QUICK = dict(QWEN25_05B, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096)


def write_random_hf_model(directory: Path, shapes: dict, max_shard_size: str, seed: int = 0) -> int:
    """Random bf16 Qwen2 checkpoint in ``directory``; returns the weights' size in bytes."""
    import torch
    import transformers

    from megatron_opsd.conversion.safetensors_io import ShardedWriter, TensorSpec, parse_size

    config = transformers.Qwen2Config(**shapes)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    names = [(n, tuple(p.shape)) for n, p in model.state_dict().items()
             if not (config.tie_word_embeddings and n == "lm_head.weight")]
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in names]
    writer = ShardedWriter(directory, specs, parse_size(max_shard_size))
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        if "norm" in spec.name:
            value = 1 + 0.1 * torch.randn(spec.shape, generator=gen)
        else:
            value = 0.02 * torch.randn(spec.shape, generator=gen)
        writer.write(spec.name, value.to(torch.bfloat16))
    writer.close()
    return sum(s.nbytes for s in specs)


class TreeSampler(threading.Thread):
    """Peak over time of the summed PSS of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.done = pid, interval, 0, False

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, ru_maxrss bytes of the process, peak tree PSS bytes) of ``cmd``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    sampler.done = True
    sampler.join()
    output = proc.stdout.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-5000:]}")
    return wall, usage.ru_maxrss * 1024, sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--max-shard-size", default="300MB", help="HF shard size of the input model")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--write-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check-round-trip", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_model:
        directory = Path(args.write_model)
        nbytes = write_random_hf_model(directory, QUICK if args.quick else QWEN25_05B, args.max_shard_size)
        (directory / "bytes.txt").write_text(str(nbytes))
        return
    if args.check_round_trip:
        _check_round_trip(*map(Path, args.check_round_trip))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="conversion_bench_"))
    hf, meg, back = work / "hf", work / "megatron", work / "hf_back"
    for d in (hf, meg, back):
        shutil.rmtree(d, ignore_errors=True)
    # This process stays small (no torch): a child's ru_maxrss starts from its parent's at fork.
    py = sys.executable
    start = time.time()
    subprocess.run([py, __file__, "--write-model", str(hf), "--max-shard-size", args.max_shard_size]
                   + (["--quick"] if args.quick else []), check=True, cwd=REPO)
    model_bytes = int((hf / "bytes.txt").read_text())
    print(f"random {'quick' if args.quick else 'Qwen2.5-0.5B-shaped'} model: {model_bytes / 2**20:.0f} MiB bf16, "
          f"{len(list(hf.glob('*.safetensors')))} shard(s), written in {time.time() - start:.1f}s")

    rows = [
        ("idle baseline", [py, "-c", "import torch, megatron.core, safetensors; "
                                      "from megatron_opsd.parallel import init_parallel"]),
        ("hf -> megatron", [py, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(meg),
                            "--dtype", "bf16"]),
        ("megatron -> hf", [py, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(meg),
                            "--out", str(back)]),
    ]
    results = []
    for name, cmd in rows:
        results.append((name, *measure(cmd)))

    mib = 2**20
    print(f"\n{'direction':<16}{'wall s':>8}{'peak RSS MiB':>14}{'peak PSS MiB':>14}{'model MiB':>11}"
          f"{'RSS/model':>11}")
    for name, wall, rss, pss in results:
        print(f"{name:<16}{wall:>8.1f}{rss / mib:>14.0f}{pss / mib:>14.0f}{model_bytes / mib:>11.0f}"
              f"{rss / model_bytes:>11.2f}")
    subprocess.run([py, __file__, "--check-round-trip", str(hf), str(back)], check=True, cwd=REPO)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _check_round_trip(a: Path, b: Path) -> None:
    """The exported tensors equal the input's, bit for bit (streamed, one tensor at a time)."""
    import torch

    from megatron_opsd.conversion.safetensors_io import checkpoint_infos, read_tensors

    infos_b = {i.name: i for i in checkpoint_infos(b)}
    infos_a = checkpoint_infos(a)
    assert set(infos_b) == {i.name for i in infos_a}, "exported tensor names differ"
    for (name, x), (_, y) in zip(read_tensors(infos_a), read_tensors(infos_b[i.name] for i in infos_a)):
        assert torch.equal(x, y), f"{name} differs after the round trip"
    print(f"round trip: all {len(infos_a)} tensors bit-exact")


if __name__ == "__main__":
    main()
