"""Vocab-parallel losses vs the unsharded fp64 reference, every case in one launch (gloo, CPU).

Layouts: the whole world as one TP group (TP = nprocs), and with 4 processes also two TP=2 groups side
by side ({0, 1} and {2, 3}, different data per group), so that a kernel using the global rank or the
default group instead of ``tp_group`` fails. Every rank builds the same full logits from a seed, takes
its vocabulary slice, and checks the per-token values (replicated on every rank) and its slice of the
gradient against the reference.

Cases: forward KL, reverse KL, JSD(0.5), JSD(0.2) x clip {None, 0.05} x temperature {1, 1.7} x
vocab_size {96 (no padding), 90 (last rank partly padding), 70 (at TP=4 the last rank is all padding)},
chunked and not; top-k (k = 1, 5, 30; 30 > V/TP at TP=4) with and without the tail bucket; token log-probs;
entropy; bf16 inputs; the identical-distributions property; the fused projection + loss
(``losses.projected``: forward KL with clip, JSD, top-k with tail; live teacher sharing W and a
separate teacher W; chunked and not) against fp64 projection onto the whole vocabulary.

Tolerances as in tests/unit/test_losses.py (fp32 kernel vs fp64 reference: values 5e-6 absolute +
5e-6 relative, gradient entries 2e-6 absolute + 1e-4 relative): the sharded sums add partial sums in a
different order than the unsharded ones, which moves results by a few fp32 ulps, well inside these.

usage: torchrun --nproc_per_node={2,4} losses_worker.py
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import losses_reference as ref  # noqa: E402
from megatron_opsd.losses import (  # noqa: E402
    vocab_parallel_divergence,
    vocab_parallel_entropy,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk_divergence,
)
from megatron_opsd.losses.projected import projected_token_loss  # noqa: E402

VALUE_TOL = dict(rtol=5e-6, atol=5e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)
BF16_GRAD_TOL = dict(rtol=1e-2, atol=1e-4)  # gradients rounded to bf16 (2^-8 relative)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


class Checker:
    def __init__(self, group: dist.ProcessGroup, seed: int):
        self.group, self.seed = group, seed
        self.tp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.width = ref.PADDED_VOCAB // self.tp
        self.count = 0

    def local(self, full: torch.Tensor) -> torch.Tensor:
        return full[..., self.rank * self.width:(self.rank + 1) * self.width].contiguous()

    def compare(self, what: str, ours_fn, ref_fn, logits: torch.Tensor, weights: torch.Tensor, *args,
                value_tol=VALUE_TOL, grad_tol=GRAD_TOL, chunk_size: int | None = None, **kwargs) -> None:
        """Value and this rank's gradient slice of ``ours_fn`` on the local slice vs ``ref_fn`` on the full
        logits; extra tensor ``args`` are full-vocabulary tensors (sliced for ours) or other inputs."""
        ref_value, ref_grad = ref.value_and_grad(ref_fn, logits, weights, *args, **kwargs)
        leaf = self.local(logits).requires_grad_()
        local_args = [self.local(a) if a.shape == logits.shape else a for a in args]
        value = ours_fn(leaf, *local_args, tp_group=self.group, chunk_size=chunk_size, **kwargs)
        (grad,) = torch.autograd.grad((value * weights).sum(), leaf)
        where = f"[tp={self.tp} rank={self.rank} seed={self.seed}] {what} chunk_size={chunk_size} {kwargs}"
        assert value.dtype == torch.float32 and value.shape == logits.shape[:-1], where
        assert grad.dtype == logits.dtype, where
        torch.testing.assert_close(value.double(), ref_value, **value_tol, msg=lambda m: f"value {where}: {m}")
        torch.testing.assert_close(grad.double(), self.local(ref_grad), **grad_tol,
                                   msg=lambda m: f"grad {where}: {m}")
        self.count += 1


    def compare_projected(self, what: str, ours_fn, ref_fn, vocab_size: int, *, live: bool, chunk_tokens: int | None,
                          hidden: int = 8, **kwargs) -> None:
        """The fused projection (``losses.projected``): this rank projects onto its vocabulary rows of W
        inside the loss; the reference projects onto the whole W in fp64. The loss must match, the
        hidden-state gradient after the TP all-reduce the caller's copy region does, and this rank's
        rows of the weight gradient."""
        gen = torch.Generator().manual_seed(self.seed + vocab_size + 7)
        n = 11
        h_s = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
        h_t = h_s + 0.5 * torch.randn(n, hidden, generator=gen, dtype=torch.float64)
        w_s = torch.randn(ref.PADDED_VOCAB, hidden, generator=gen, dtype=torch.float64)
        w_t = w_s if live else w_s + 0.3 * torch.randn(w_s.shape, generator=gen, dtype=torch.float64)
        mask = (torch.rand(n, generator=gen) > 0.2).double()
        leaves = [h_s.clone().requires_grad_(), w_s.clone().requires_grad_()]
        ref_loss = (ref_fn(leaves[0] @ leaves[1].t(), h_t @ w_t.t(), vocab_size=vocab_size, **kwargs) * mask).sum()
        ref_gh, ref_gw = torch.autograd.grad(ref_loss, leaves)

        rows = slice(self.rank * self.width, (self.rank + 1) * self.width)
        h = h_s.float().requires_grad_()
        w = w_s[rows].float().requires_grad_()
        w_teacher = w if live else w_t[rows].float()
        loss, _ = projected_token_loss(
            h, w, h_t.float(), w_teacher,
            lambda s, t, r: ours_fn(s, t, vocab_size=vocab_size, tp_group=self.group, **kwargs),
            mask.float(), chunk_tokens=chunk_tokens)
        loss.backward()
        grad_h = h.grad.clone()
        dist.all_reduce(grad_h, group=self.group)
        where = f"[tp={self.tp} rank={self.rank}] projected {what} live={live} chunk={chunk_tokens} {kwargs}"
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **VALUE_TOL, msg=lambda m: f"value {where}: {m}")
        torch.testing.assert_close(grad_h.double(), ref_gh, **GRAD_TOL, msg=lambda m: f"dh {where}: {m}")
        torch.testing.assert_close(w.grad.double(), ref_gw[rows], **GRAD_TOL, msg=lambda m: f"dW {where}: {m}")
        self.count += 1


def run_cases(check: Checker) -> None:
    for vocab_size in (96, 90, 70):
        student, teacher, weights = ref.make_logits(check.seed + vocab_size, vocab_size=vocab_size)
        grid = itertools.product(DIVERGENCES, (None, 0.05), (1.0, 1.7))
        for index, ((divergence, beta), clip, temperature) in enumerate(grid):
            check.compare("divergence", vocab_parallel_divergence, ref.divergence, student, weights, teacher,
                          divergence=divergence, beta=beta, clip=clip, temperature=temperature,
                          vocab_size=vocab_size, chunk_size=4 if index % 2 else None)
        for (divergence, beta), (k, tail) in itertools.product(DIVERGENCES, ((1, True), (5, False), (5, True),
                                                                             (30, False), (30, True))):
            check.compare("topk", vocab_parallel_topk_divergence, ref.topk_divergence, student, weights, teacher,
                          k=k, tail=tail, divergence=divergence, beta=beta, temperature=1.3,
                          vocab_size=vocab_size, clip=0.05 if k == 5 else None)
        ids = torch.randint(0, vocab_size, ref.LEAD_SHAPE, generator=torch.Generator().manual_seed(check.seed))
        for temperature in (1.0, 0.7):
            check.compare("token_logprobs", vocab_parallel_token_logprobs, ref.token_logprobs, student, weights,
                          ids, temperature=temperature, vocab_size=vocab_size, chunk_size=2)
            check.compare("entropy", vocab_parallel_entropy, ref.entropy, student, weights,
                          temperature=temperature, vocab_size=vocab_size)

        for live, chunk_tokens in ((True, 3), (False, None)):
            check.compare_projected("forward_kl", vocab_parallel_divergence, ref.divergence, vocab_size, live=live,
                                    chunk_tokens=chunk_tokens, divergence="forward_kl", clip=0.05,
                                    temperature=1.3)
            check.compare_projected("jsd", vocab_parallel_divergence, ref.divergence, vocab_size, live=live,
                                    chunk_tokens=chunk_tokens, divergence="jsd", beta=0.3)
        check.compare_projected("topk tail", vocab_parallel_topk_divergence, ref.topk_divergence, vocab_size,
                                live=True, chunk_tokens=4, k=5, tail=True)

        check.compare("divergence bf16", vocab_parallel_divergence, ref.divergence, student.bfloat16(), weights,
                      teacher.bfloat16(), divergence="jsd", beta=0.3, clip=0.05, temperature=1.1,
                      vocab_size=vocab_size, grad_tol=BF16_GRAD_TOL)
        for divergence, beta in DIVERGENCES:
            value = vocab_parallel_divergence(check.local(student), check.local(student), divergence=divergence,
                                              beta=beta, clip=0.05, vocab_size=vocab_size, tp_group=check.group)
            assert value.abs().max() <= 1e-6, f"identical distributions gave {value.abs().max()}"
            check.count += 1


def main() -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    layouts = [[list(range(world))]]
    if world == 4:
        layouts.append([[0, 1], [2, 3]])
    total = 0
    for layout in layouts:
        groups = [dist.new_group(ranks) for ranks in layout]  # every rank creates every group, in order
        for index, ranks in enumerate(layout):
            if rank in ranks:
                check = Checker(groups[index], seed=100 * index)
                run_cases(check)
                total += check.count
        dist.barrier()
    counts = [None] * world
    dist.all_gather_object(counts, total)
    if rank == 0:
        print(f"losses_worker: {sum(counts)} checks passed on {world} ranks (per rank: {counts})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
