"""Calibration sets from robopt's own data, always disjoint from what the evaluators measure on: the digits
training split, expert demonstration states on training seeds, and (labelled as such) random inputs."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from robopt.calibration.samples import Sample, batch_one, conform_sample, count_phrase, seeded_order
from robopt.domain.records import InputSpec
from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs

RANDOM_SOURCE = "random inputs from the input spec (no calibration data; pass --calibration FILE)"
TRAINING_SEED_LIMIT = 1000  # zoo policies train on episode seeds below this; closed-loop evaluation starts at it
STATES_PER_EPISODE = 8  # states taken per demonstration episode, spread over it (more episodes, less correlation)


def digits_split_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """`n` images of one split of scikit-learn digits (the split the evaluator does not measure on)."""
    from robopt.evaluation.datasets import digits_split

    x_train, _, x_test, _ = digits_split()
    split = params["split"]
    x = x_train if split == "train" else x_test
    order = seeded_order(x.shape[0], seed)[:n]
    where = f"the digits {split} split"
    samples = [conform_sample((x[i : i + 1],), spec, where) for i in progress.track(order, "calibration")]
    measured = "test" if split == "train" else "train"
    source = (
        f"scikit-learn digits {split} split ({x.shape[0]:,} images; the evaluator measures on the {measured} split): "
        f"{count_phrase(len(samples), n, x.shape[0])}, seed {seed}"
    )
    return samples, source


def calibration_episode_seeds(excluded: tuple[int, int], seed: int) -> list[int]:
    """Episode seeds below TRAINING_SEED_LIMIT outside the evaluator's episode range [start, stop), in an order
    fixed by `seed` (the evaluator's own offline proxies use seeds far above the limit)."""
    start, stop = excluded
    eligible = [s for s in range(TRAINING_SEED_LIMIT) if not start <= s < stop]
    if not eligible:
        raise TechniqueNotApplicableError(
            f"every episode seed below {TRAINING_SEED_LIMIT} is an evaluation episode, so no calibration states are "
            "left that the evaluator does not measure on",
            "evaluate on episodes from seed 1000 on (the default first_seed), or pass --calibration FILE",
        )
    return [eligible[i] for i in seeded_order(len(eligible), seed)]


def expert_state_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """Model inputs of the task's scripted expert: STATES_PER_EPISODE distinct states spread over each episode,
    episodes on training seeds, shuffled with `seed` before the first `n` are kept. For mini-vla a sample is
    image + instruction."""
    from robopt.robotics.rollout import expert_demonstrations
    from robopt.robotics.task import make_task

    task_name = params["task"]
    per_episode = int(params["states_per_episode"])
    seeds = calibration_episode_seeds(tuple(params["excluded_seeds"]), seed)
    seeds = seeds[: min(len(seeds), math.ceil(n / per_episode))]
    task = make_task(task_name)
    states: list[tuple[Any, ...]] = []
    try:
        progress.message("calibration", f"rolling out the {task_name} expert on {len(seeds)} training seed(s)")
        for episode_seed in progress.track(seeds, "calibration rollouts"):
            inputs = _distinct(expert_demonstrations(task, [episode_seed])[0])
            picks = sorted({round(x) for x in np.linspace(0, len(inputs) - 1, min(per_episode, len(inputs)))})
            states.extend(inputs[i] for i in picks)
    finally:
        task.close()
    where = f"expert states of closed-loop:{task_name}"
    samples = [conform_sample(states[i], spec, where) for i in seeded_order(len(states), seed)[:n]]
    start, stop = params["excluded_seeds"]
    source = (
        f"expert demonstration states of closed-loop:{task_name} on {len(seeds)} training episode(s) (seeds below "
        f"{TRAINING_SEED_LIMIT}; the evaluator's episode seeds {start}-{stop - 1} excluded): "
        f"{count_phrase(len(samples), n, None)}, seed {seed}"
    )
    return samples, source


def _distinct(states: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The states in order without repeats (a robot that has arrived and holds still repeats its last view)."""
    seen: set[bytes] = set()
    kept = []
    for state in states:
        key = b"".join(t.contiguous().numpy().tobytes() for t in state)
        if key not in seen:
            seen.add(key)
            kept.append(state)
    return kept


def _sample_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") & (2**63 - 1)


def random_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """Standard-normal floats and uniform ids below `high` (robopt.tools.example_inputs): a weak calibration that
    only fixes shapes and rough ranges, which the source line says."""
    if spec is None:
        raise TechniqueNotApplicableError(
            "no calibration data: the evaluator has none and the model's input shapes are unknown",
            "pass --calibration FILE (a .npz with one array per model input) or --input-shape",
        )
    single = batch_one(spec)
    samples = [make_example_inputs(single, _sample_seed(seed, i)) for i in progress.track(range(n), "calibration")]
    return samples, RANDOM_SOURCE
