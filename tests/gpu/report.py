"""Print what run_gpu_checks.sh covered: each check, the GPU-readiness item it covers, its result."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

ITEMS = {  # test name prefix -> what it covers on CUDA
    "test_train_evaluate_save_resume_on_cuda": "1 CPU tensors in NCCL collectives; 5 bf16 EMA; checkpoint save/resume",
    "test_fp16_training_step_on_cuda": "6 fp16 loss scaling",
    "test_convert_and_verify_on_cuda": "1 verify devices; conversion round trip",
    "test_bf16_forward_at_fused_softmax_lengths": "3 fused masked softmax",
    "test_rollout_attention_operands_run_on_a_fused_kernel": "9 SDPA fused kernel with GQA + mask",
    "test_bf16_ema_teacher_follows_an_fp64_ema": "5 bf16 EMA (unit)",
    "test_fp16_updates_match_fp32": "6 fp16 vs fp32 update (unit)",
    "test_checkpoints_load_across_extra_state": "2 _extra_state tolerant loads",
    "test_rollout_attention": "9 rollout attention (unit)",
    "test_greedy": "rollout greedy parity with transformers",
    "test_packing_on_off_on_cuda": "packing on vs off, token budget vs fixed (local spec)",
}
NOT_COVERED = [
    "Transformer Engine layer spec (TE is not installed on the check machine)",
    "multi-GPU NCCL: TP/PP/DP across GPUs, the distributed optimizer across ranks",
    "context parallelism (parallel.cp: needs TE attention; CPU-tested with a test-only attention), "
    "sequence parallelism, FP8, Apex fused kernels",
    "packed micro-batches as THD PackedSeqParams (Transformer Engine attention)",
]


def main(path: str) -> None:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        result = "skipped" if case.find("skipped") is not None else \
            "FAILED" if case.find("failure") is not None or case.find("error") is not None else "passed"
        item = next((v for k, v in ITEMS.items() if name.startswith(k)), "")
        rows.append((f"{case.get('classname').rsplit('.', 1)[-1]}::{name}", item, result, float(case.get("time", 0))))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"\n{'check':<{width}}  {'result':<7}  {'s':>6}  covers")
    for name, item, result, seconds in rows:
        print(f"{name:<{width}}  {result:<7}  {seconds:6.1f}  {item}")
    counts = {r: sum(1 for row in rows if row[2] == r) for r in ("passed", "FAILED", "skipped")}
    print(f"\n{counts['passed']} passed, {counts['FAILED']} failed, {counts['skipped']} skipped")
    print("not covered here: " + "; ".join(NOT_COVERED))


if __name__ == "__main__":
    main(sys.argv[1])
