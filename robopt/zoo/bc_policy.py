"""MLP control policies cloned from a task's scripted expert: behaviour cloning on demonstrations, then DAgger.

Used by the `reacher-policy` and `fetchreach-policy` zoo entries. Episodes of the training set use seeds in
[0, 1000); evaluation seeds start at 1000, so a policy is never judged on an episode it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robopt.progress import Progress
from robopt.robotics.rollout import expert_demonstrations, model_policy, run_episodes
from robopt.robotics.task import ClosedLoopTask
from robopt.tools.threads import torch_threads

EVAL_SEED_START = 1000  # evaluation episodes use seeds >= 1000; training never does
# Input dims that barely vary in the demonstrations (Fetch's fingers, which the expert never moves) are scaled by
# at most 1/STD_FLOOR, so tiny deviations at run time are not blown up into huge normalised inputs.
STD_FLOOR = 1e-3


class MLPPolicy(nn.Module):
    """observation -> normalise -> [Linear(hidden) -> ReLU] x depth -> Linear(action_dim).

    The normalisation statistics are buffers (saved in the state dict), so the saved model is self-contained:
    it takes raw observations. The output is unbounded; the task clips it to its action space.
    """

    def __init__(self, observation_dim: int, action_dim: int, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.register_buffer("observation_mean", torch.zeros(observation_dim))
        self.register_buffer("observation_std", torch.ones(observation_dim))
        layers: list[nn.Module] = []
        width = observation_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net((observation - self.observation_mean) / self.observation_std)

    def set_normalisation(self, observations: torch.Tensor) -> None:
        """Standardise inputs with the mean and std of `observations` (rows = samples)."""
        self.observation_mean.copy_(observations.mean(0))
        self.observation_std.copy_(observations.std(0).clamp_min(STD_FLOOR))


@dataclass(frozen=True)
class CloningConfig:
    """How a policy is cloned: expert demonstrations, then DAgger rounds, each followed by `epochs` of regression.

    DAgger: the current policy drives episodes while the expert labels every state it visits; the labelled
    states join the data set, so the policy learns to recover from its own mistakes.
    """

    demonstration_seeds: Sequence[int]
    dagger_seeds: Sequence[Sequence[int]] = ()  # one seed list per DAgger round
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        seeds = [*self.demonstration_seeds, *(s for round_seeds in self.dagger_seeds for s in round_seeds)]
        if not seeds or not all(0 <= s < EVAL_SEED_START for s in seeds):
            raise ValueError(f"training episode seeds must lie in [0, {EVAL_SEED_START}) (evaluation uses the rest)")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and learning_rate > 0")

    @property
    def total_epochs(self) -> int:
        return self.epochs * (1 + len(self.dagger_seeds))


def _stack(inputs: list[tuple[torch.Tensor, ...]], actions: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x[0] for x in inputs]), torch.as_tensor(np.stack(actions), dtype=torch.float32)


def _dagger_round(
    task: ClosedLoopTask, model: MLPPolicy, seeds: Sequence[int], progress: Progress
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Let the policy drive `seeds`; return the visited inputs, the expert's actions there, and the success rate."""
    drive = model_policy(task, model)
    inputs: list[tuple[torch.Tensor, ...]] = []
    actions: list[np.ndarray] = []

    def labelled(observation: object) -> np.ndarray:
        inputs.append(task.model_inputs(observation))
        actions.append(np.asarray(task.expert_action(), dtype=np.float32))
        return drive(observation)

    outcomes = run_episodes(task, labelled, seeds, progress=progress, stage="dagger")
    model.train()
    return *_stack(inputs, actions), float(np.mean([o.success for o in outcomes]))


def clone_policy(
    make_task: Callable[[], ClosedLoopTask],
    config: CloningConfig,
    seed: int,
    progress: Progress,
    architecture_kwargs: dict[str, Any],
) -> MLPPolicy:
    """Behaviour-clone the task's expert into an MLPPolicy (MSE, Adam), then refine it with DAgger rounds.

    Deterministic for a given seed: fixed episode seeds, seeded init and batch order, one thread. Reports
    progress for demonstrations, each DAgger rollout and every epoch ("train"); the global RNG is preserved.
    """
    task = make_task()
    try:
        with torch.random.fork_rng(devices=[]), torch_threads(1):
            torch.manual_seed(seed)
            model = MLPPolicy(**architecture_kwargs)
            inputs, actions, _ = expert_demonstrations(task, config.demonstration_seeds, progress)
            x, y = _stack(inputs, actions)
            model.set_normalisation(x)
            optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
            order = torch.Generator().manual_seed(seed)
            done = 0
            progress.update("train", 0, config.total_epochs)
            for round_index in range(len(config.dagger_seeds) + 1):
                if round_index:
                    new_x, new_y, rate = _dagger_round(task, model, config.dagger_seeds[round_index - 1], progress)
                    progress.message("dagger", f"round {round_index}: the policy succeeded in {rate:.0%} of episodes")
                    x, y = torch.cat([x, new_x]), torch.cat([y, new_y])
                model.train()
                for _ in range(config.epochs):
                    for idx in torch.randperm(len(x), generator=order).split(config.batch_size):
                        optimizer.zero_grad()
                        F.mse_loss(model(x[idx]), y[idx]).backward()
                        optimizer.step()
                    done += 1
                    progress.update("train", done, config.total_epochs)
    finally:
        task.close()
    return model.eval()
