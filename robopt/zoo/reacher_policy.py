"""reacher-policy: an MLP behaviour-cloned (plus one DAgger round) from the Reacher-v5 Jacobian-transpose expert."""

from __future__ import annotations

from typing import Any

from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.robotics.reacher_task import ReacherTask
from robopt.zoo.bc_policy import CloningConfig, MLPPolicy, clone_policy
from robopt.zoo.cards import ZooEntry, register_entry

# 200 expert episodes (10,000 states), then one DAgger round on 100 more episodes; seeds stay below 1000.
CLONING = CloningConfig(demonstration_seeds=range(200), dagger_seeds=[range(200, 300)], epochs=20)


def train_reacher_policy(seed: int, progress: Progress, architecture_kwargs: dict[str, Any]) -> MLPPolicy:
    """Clone the reacher expert into an MLPPolicy (deterministic for a given seed)."""
    return clone_policy(ReacherTask, CLONING, seed, progress, architecture_kwargs)


register_entry(
    ZooEntry(
        name="reacher-policy",
        description="MLP policy (10 -> 256 -> 256 -> 2) for MuJoCo Reacher-v5 at 50 Hz, cloned from a scripted "
        "Jacobian-transpose expert; success = fingertip within 2 cm of the target at the end of the episode.",
        architecture=f"{MLPPolicy.__module__}:{MLPPolicy.__qualname__}",
        architecture_kwargs={"observation_dim": 10, "action_dim": 2, "hidden": 256, "depth": 2},
        family="mlp-policy",
        input_spec=InputSpec(inputs=[TensorSpec(name="observation", shape=[1, 10])], source="zoo"),
        evaluator=EvaluatorSpec(name="closed-loop", dataset="reacher", options={"episodes": 50}),
        suggested_criteria={"max_size": "33%", "max_accuracy_drop": "10%", "control_rate": "50Hz"},
        seed=0,
        train=train_reacher_policy,
    )
)
