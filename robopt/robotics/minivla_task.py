"""The "mini-vla" closed-loop task: reach the ball a written instruction names, seen through a 64x64 top-down camera.

Each seeded episode places four coloured balls (red, green, blue, yellow) on a table, starts a two-link arm in
a random pose at least 8 cm from every ball and draws an instruction such as "reach the blue ball". An episode
is 30 control ticks at 10 Hz (the scripted expert needs at most about 10). The model sees the rendered RGB image and
the instruction's token ids and emits, OpenVLA-style, one discretized action token per action dimension:
256 uniform bins over the fingertip's displacement for this tick (dx, dy), in metres. The task's low-level
controller keeps the fingertip inside the camera's view (a workspace fence) and turns the displacement into joint
speeds (damped-least-squares inverse kinematics) for the arm's velocity actuators.

Success (judged at the end of the episode): the fingertip is within SUCCESS_RADIUS (4 cm) of the instructed
ball's centre, measured in the table plane (the top-down camera's view; the arm moves just above the balls).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from robopt.errors import EvaluationError
from robopt.robotics import minivla_scene as scene
from robopt.robotics.task import ClosedLoopTask, StepResult, ensure_headless_rendering, register_task

CONTROL_HZ = 10.0
EPISODE_TICKS = 30
IMAGE_SIZE = 64
ACTION_LIMIT = 0.04  # m per tick: the action bins span [-ACTION_LIMIT, ACTION_LIMIT] in x and y
SUCCESS_RADIUS = 0.04  # m
EXPERT_GAIN = 0.5  # fraction of the remaining distance the expert asks for each tick
EXPERT_MAX_STEP = 0.03  # m per tick (0.3 m/s at 10 Hz)

# The instruction language: a fixed word table (0 pads) and a few phrasings of "reach the <colour> ball".
VOCABULARY: tuple[str, ...] = (
    "<pad>",
    "reach",
    "the",
    "ball",
    "move",
    "to",
    "touch",
    "go",
    "sphere",
    *scene.COLOUR_NAMES,
)
WORD_IDS: dict[str, int] = {word: i for i, word in enumerate(VOCABULARY)}
PHRASINGS: tuple[str, ...] = (
    "reach the {colour} ball",
    "move to the {colour} ball",
    "touch the {colour} ball",
    "go to the {colour} sphere",
)
INSTRUCTION_LENGTH = 6


def tokenize(instruction: str) -> np.ndarray:
    """Word ids of `instruction`, right-padded with 0 to INSTRUCTION_LENGTH; unknown words raise EvaluationError."""
    words = instruction.lower().split()
    unknown = [w for w in words if w not in WORD_IDS]
    if unknown or len(words) > INSTRUCTION_LENGTH:
        raise EvaluationError(
            f"cannot tokenize instruction {instruction!r} for the mini-vla task",
            f"use at most {INSTRUCTION_LENGTH} words from: {', '.join(VOCABULARY[1:])}",
        )
    ids = np.zeros(INSTRUCTION_LENGTH, dtype=np.int64)
    ids[: len(words)] = [WORD_IDS[w] for w in words]
    return ids


def bin_centres(bins: int = 256) -> np.ndarray:
    """The action value each bin stands for: the centres of `bins` uniform bins over [-ACTION_LIMIT, ACTION_LIMIT]."""
    edges = np.linspace(-ACTION_LIMIT, ACTION_LIMIT, bins + 1)
    return ((edges[:-1] + edges[1:]) / 2).astype(np.float32)


def action_to_bins(action: np.ndarray, bins: int = 256) -> np.ndarray:
    """The bin index of each action component (the inverse of decoding, for training labels)."""
    scaled = (np.asarray(action, dtype=np.float64) + ACTION_LIMIT) / (2 * ACTION_LIMIT) * bins
    return np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)


class MiniVlaTask(ClosedLoopTask):
    """Reach the instructed ball. `swap_instruction=True` names another ball (the seed's decoy) in the
    instruction while success is still judged on the original target: a policy that follows the language then
    fails, one that ignores it does not notice."""

    name: ClassVar[str] = "mini-vla"
    description: ClassVar[str] = (
        "Two-link arm over a table with four coloured balls; 64x64 top-down camera + instruction "
        "('reach the red ball') -> 2 action tokens of 256 bins (fingertip dx, dy); success = within 4 cm at the end."
    )
    control_hz: ClassVar[float] = CONTROL_HZ
    max_steps: ClassVar[int] = EPISODE_TICKS
    action_dim: ClassVar[int] = 2
    action_bins: ClassVar[int | None] = 256

    def __init__(self, image_size: int = IMAGE_SIZE, swap_instruction: bool = False) -> None:
        ensure_headless_rendering()
        import mujoco

        if not 64 <= image_size <= 96:
            raise EvaluationError(f"mini-vla renders 64..96 pixel images, not {image_size}", "use image_size=64")
        self._mujoco = mujoco
        self.model = mujoco.MjModel.from_xml_string(scene.scene_xml())
        self.data = mujoco.MjData(self.model)
        self.image_size = image_size
        self.swap_instruction = swap_instruction
        self._renderer: Any = None
        self._fingertip = self.model.site("fingertip").id
        self._substeps = round(1.0 / (CONTROL_HZ * self.model.opt.timestep))
        self._centres = bin_centres(self.action_bins or 256)
        self._target: int | None = None
        self._phrasing = 0
        self._balls = np.zeros((len(scene.COLOUR_NAMES), 2))
        self.instruction = ""
        self._instruction_ids = np.zeros(INSTRUCTION_LENGTH, dtype=np.int64)

    # -- episode ---------------------------------------------------------------------------------------------

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        layout = scene.sample_layout(seed, len(PHRASINGS))
        mujoco = self._mujoco
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = layout.joints
        for i, name in enumerate(scene.COLOUR_NAMES):
            self.data.mocap_pos[self.model.body(f"ball_{name}").mocapid[0]] = [*layout.balls[i], scene.BALL_RADIUS]
        mujoco.mj_forward(self.model, self.data)
        self._balls = layout.balls
        self._target = layout.target
        self._phrasing = layout.phrasing
        named = layout.decoy if self.swap_instruction else layout.target
        self.instruction = PHRASINGS[layout.phrasing].format(colour=scene.COLOUR_NAMES[named])
        self._instruction_ids = tokenize(self.instruction)
        return self._observe()

    def step(self, action: np.ndarray) -> StepResult:
        self._require_episode()
        displacement = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -ACTION_LIMIT, ACTION_LIMIT)
        if displacement.shape != (self.action_dim,) or not np.all(np.isfinite(displacement)):
            raise EvaluationError(
                f"mini-vla expects a finite action of {self.action_dim} values, got {np.asarray(action).shape}"
            )
        tip = self.fingertip()
        displacement = scene.fenced(tip + displacement) - tip
        joint_step = scene.joint_step_for(displacement, self.data.qpos[:2])
        self.data.ctrl[:] = np.clip(joint_step * CONTROL_HZ, -scene.JOINT_SPEED_LIMIT, scene.JOINT_SPEED_LIMIT)
        self._mujoco.mj_step(self.model, self.data, nstep=self._substeps)
        return StepResult(observation=self._observe(), reward=-self.target_distance(), terminated=False)

    def success(self) -> bool:
        return self.target_distance() <= SUCCESS_RADIUS

    def target_distance(self) -> float:
        """Distance (m) in the table plane from the fingertip to the ball success is judged on."""
        self._require_episode()
        return float(np.linalg.norm(self.fingertip() - self._balls[self._target]))

    def fingertip(self) -> np.ndarray:
        """The fingertip's (x, y) on the table plane (m)."""
        return self.data.site_xpos[self._fingertip][:2].copy()

    def ball_positions(self) -> np.ndarray:
        """[balls, 2]: every ball's centre (x, y) in COLOUR_NAMES order (m)."""
        self._require_episode()
        return self._balls.copy()

    def expert_action(self) -> np.ndarray:
        self._require_episode()
        return self.expert_action_toward(self._target)

    def expert_action_toward(self, ball: int) -> np.ndarray:
        """The expert's action if ball `ball` (index into COLOUR_NAMES) were the target: for relabelling a
        frame with every instruction the scene could have been given."""
        self._require_episode()
        step = scene.expert_step(self.fingertip(), self._balls[ball], EXPERT_GAIN, EXPERT_MAX_STEP)
        return step.astype(np.float32)

    def instruction_naming(self, ball: int) -> np.ndarray:
        """Token ids of this episode's phrasing with ball `ball`'s colour."""
        self._require_episode()
        return tokenize(PHRASINGS[self._phrasing].format(colour=scene.COLOUR_NAMES[ball]))

    # -- the model's view ------------------------------------------------------------------------------------

    def model_inputs(self, observation: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        image = torch.from_numpy(observation["image"]).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
        return image, torch.from_numpy(observation["instruction"]).unsqueeze(0)

    def decode_action(self, output: torch.Tensor) -> np.ndarray:
        bins = self.action_bins or 256
        if tuple(output.shape) not in ((1, self.action_dim, bins), (self.action_dim, bins)):
            raise EvaluationError(
                f"mini-vla expects action logits of shape [1, {self.action_dim}, {bins}], got {list(output.shape)}",
                "the model must emit one 256-bin action token per action dimension",
            )
        index = output.reshape(self.action_dim, bins).argmax(dim=-1).numpy()
        return self._centres[index]

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- internals -------------------------------------------------------------------------------------------

    def _observe(self) -> dict[str, np.ndarray]:
        if self._renderer is None:
            self._renderer = self._mujoco.Renderer(self.model, self.image_size, self.image_size)
        self._renderer.update_scene(self.data, camera="top")
        return {"image": self._renderer.render().copy(), "instruction": self._instruction_ids.copy()}

    def _require_episode(self) -> None:
        if self._target is None:
            raise EvaluationError("the mini-vla episode has not started", "call reset(seed) first")


@register_task("mini-vla", MiniVlaTask.description)
def make_minivla_task() -> MiniVlaTask:
    return MiniVlaTask()
