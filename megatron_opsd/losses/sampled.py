"""The sampled-token advantage loss (OPSD_METHOD.md §2), for comparison with the full-vocabulary loss."""

from __future__ import annotations

import torch


def sampled_token_advantage_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per token −A · log p_S(ŷ) with the advantage A = sg[log p_T(ŷ) − log p_S(ŷ)].

    Inputs: log-probabilities of the sampled tokens, [...] each (e.g. from
    ``vocab_parallel_token_logprobs``). Returns fp32 [...], unmasked; its gradient w.r.t.
    ``student_logprobs`` is −A, and the teacher is a constant.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape")
    student = student_logprobs.float()
    advantage = teacher_logprobs.detach().float() - student.detach()
    return -advantage * student
