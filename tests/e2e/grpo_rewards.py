"""Reward functions for the GRPO end-to-end tests (loaded by loss.reward as a dotted path)."""


def length(problem, response: str) -> float:
    """Varies within a group, so advantages are non-zero even for an untrained model."""
    return float(len(response) % 5)


def boom(problem, response: str) -> float:
    raise KeyError("no grader for this problem")


def nan(problem, response: str) -> float:
    return float("nan")


def boom_on_rank_1(problem, response: str) -> float:
    """Fails on one data-parallel rank only: the others must stop too, not wait for it."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("grader crashed")
    return 0.0
