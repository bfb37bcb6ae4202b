"""The OPSD step: teacher and student context passes in one megatron-core pipeline schedule."""

from megatron_opsd.opsd.config import LossConfig
from megatron_opsd.opsd.step import NonFiniteError, StepContext, run_schedule, train_step
from megatron_opsd.opsd.teacher import (AdapterTeacher, EMATeacher, FrozenTeacher, Teacher,
                                        check_teacher_isolated)

__all__ = ["AdapterTeacher", "EMATeacher", "FrozenTeacher", "LossConfig", "NonFiniteError", "StepContext", "Teacher",
           "check_teacher_isolated", "run_schedule", "train_step"]
