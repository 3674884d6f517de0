"""fetchreach-policy: an MLP behaviour-cloned (plus one DAgger round) from a proportional FetchReach-v4 expert."""

from __future__ import annotations

from typing import Any

from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.robotics.fetchreach_task import FetchReachTask
from robopt.zoo.bc_policy import CloningConfig, MLPPolicy, clone_policy
from robopt.zoo.cards import ZooEntry, register_entry

# Fetch steps are slow (~1 ms each): 80 expert episodes (4,000 states) and one DAgger round of 40 episodes.
CLONING = CloningConfig(demonstration_seeds=range(80), dagger_seeds=[range(80, 120)], epochs=25)


def train_fetchreach_policy(seed: int, progress: Progress, architecture_kwargs: dict[str, Any]) -> MLPPolicy:
    """Clone the FetchReach expert into an MLPPolicy (deterministic for a given seed)."""
    return clone_policy(FetchReachTask, CLONING, seed, progress, architecture_kwargs)


register_entry(
    ZooEntry(
        name="fetchreach-policy",
        description="MLP policy (13 -> 256 -> 256 -> 4) for gymnasium-robotics FetchReach-v4 at 25 Hz, cloned "
        "from a proportional expert; success = the env's is_success (gripper within 5 cm of the goal) at the end.",
        architecture=f"{MLPPolicy.__module__}:{MLPPolicy.__qualname__}",
        architecture_kwargs={"observation_dim": 13, "action_dim": 4, "hidden": 256, "depth": 2},
        family="mlp-policy",
        input_spec=InputSpec(inputs=[TensorSpec(name="observation", shape=[1, 13])], source="zoo"),
        evaluator=EvaluatorSpec(name="closed-loop", dataset="fetchreach", options={"episodes": 50}),
        suggested_criteria={"max_size": "33%", "max_accuracy_drop": "10%", "control_rate": "25Hz"},
        seed=0,
        train=train_fetchreach_policy,
    )
)
