"""Reward functions for the GRPO end-to-end tests (loaded by loss.reward as a dotted path)."""


def length(problem, response: str) -> float:
    """Varies within a group, so advantages are non-zero even for an untrained model."""
    return float(len(response) % 5)


def boom(problem, response: str) -> float:
    raise KeyError("no grader for this problem")


def nan(problem, response: str) -> float:
    return float("nan")
