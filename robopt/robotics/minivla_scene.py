"""The mini-VLA table scene: a two-link planar arm over a table, four coloured balls, a fixed top-down camera.

Pure geometry and kinematics, no task logic: the MJCF string, the seeded episode layout, the arm's
damped-least-squares inverse kinematics, and the scripted expert's end-effector step toward a ball.

Coordinates: the arm's shoulder sits at the world origin; the table top is the plane z = 0. The arm moves
in the horizontal plane ARM_Z above the table, slightly above the balls' tops, and nothing collides (the
balls are visual targets the fingertip reaches over), so reaching is judged in the table plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LINK1 = 0.18  # shoulder -> elbow (m)
LINK2 = 0.16  # elbow -> fingertip (m)
ELBOW_LIMIT = 2.9  # rad: the forearm may fold back almost onto the upper arm
BALL_RADIUS = 0.025
ARM_Z = 0.06  # height of the arm's plane above the table top
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# The workspace: a rectangle in front of the shoulder, inside the arm's reach (0.05..0.34 m), that the camera
# frames closely (64 pixels over ~0.38 m: a ball is ~8 pixels across, an 8-pixel patch ~4.7 cm).
WORKSPACE_X = (-0.15, 0.15)
WORKSPACE_Y = (0.08, 0.28)
BALL_MIN_GAP = 0.075  # centre-to-centre distance between any two balls (m)
START_MIN_GAP = 0.08  # the fingertip starts at least this far from every ball, so no episode starts solved
CAMERA_CENTRE = (0.0, 0.18)
CAMERA_HEIGHT = 0.9
CAMERA_FOVY = 23.8  # degrees: about 0.38 m of table in view

# The fence: the low-level controller keeps the fingertip where the camera sees it (like a real arm's workspace
# limits), so no policy can push it out of view and lose it.
FENCE_X = (-0.165, 0.165)
FENCE_Y = (0.015, 0.345)

PHYSICS_TIMESTEP = 0.005  # s
JOINT_SPEED_LIMIT = 6.0  # rad/s, the velocity actuators' control range


def scene_xml() -> str:
    """The MJCF model: table, shoulder base, two velocity-actuated hinge links, fingertip site, four mocap balls."""
    balls = "\n".join(
        f'    <body name="ball_{name}" mocap="true" pos="0 0.1 {BALL_RADIUS}">'
        f'<geom type="sphere" size="{BALL_RADIUS}" rgba="{r} {g} {b} 1"/></body>'
        for name, (r, g, b) in COLOURS.items()
    )
    camera = f"{CAMERA_CENTRE[0]} {CAMERA_CENTRE[1]} {CAMERA_HEIGHT}"
    return f"""<mujoco model="mini-vla">
  <compiler angle="radian"/>
  <option timestep="{PHYSICS_TIMESTEP}" integrator="implicitfast" gravity="0 0 -9.81"/>
  <visual>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.3 0.3 0.3" specular="0 0 0"/>
    <global offwidth="96" offheight="96"/>
    <quality shadowsize="0" offsamples="0"/>
  </visual>
  <default>
    <geom contype="0" conaffinity="0"/>
    <joint damping="0.05" armature="0.01"/>
  </default>
  <worldbody>
    <light directional="true" dir="0 0 -1" castshadow="false" diffuse="0.3 0.3 0.3"/>
    <geom name="table" type="box" pos="0 0.15 -0.01" size="0.45 0.4 0.01" rgba="0.6 0.58 0.54 1"/>
    <geom name="base" type="cylinder" pos="0 0 {ARM_Z / 2}" size="0.03 {ARM_Z / 2}" rgba="0.15 0.15 0.15 1"/>
    <body name="upper_arm" pos="0 0 {ARM_Z}">
      <joint name="shoulder" type="hinge" axis="0 0 1"/>
      <geom type="capsule" fromto="0 0 0 {LINK1} 0 0" size="0.009" rgba="0.25 0.25 0.3 1"/>
      <body name="forearm" pos="{LINK1} 0 0">
        <joint name="elbow" type="hinge" axis="0 0 1" limited="true" range="{-ELBOW_LIMIT} {ELBOW_LIMIT}"/>
        <geom type="capsule" fromto="0 0 0 {LINK2} 0 0" size="0.007" rgba="0.35 0.35 0.4 1"/>
        <geom type="sphere" pos="{LINK2} 0 0" size="0.014" rgba="1 1 1 1"/>
        <site name="fingertip" pos="{LINK2} 0 0" size="0.005"/>
      </body>
    </body>
{balls}
    <camera name="top" pos="{camera}" xyaxes="1 0 0 0 1 0" fovy="{CAMERA_FOVY}"/>
  </worldbody>
  <actuator>
    <velocity joint="shoulder" kv="1.0" ctrlrange="{-JOINT_SPEED_LIMIT} {JOINT_SPEED_LIMIT}"/>
    <velocity joint="elbow" kv="1.0" ctrlrange="{-JOINT_SPEED_LIMIT} {JOINT_SPEED_LIMIT}"/>
  </actuator>
</mujoco>
"""


@dataclass(frozen=True)
class EpisodeLayout:
    """One seeded episode: the arm's start angles, every ball's (x, y), the target ball and the phrasing."""

    joints: np.ndarray  # (2,) shoulder, elbow (rad)
    balls: np.ndarray  # (len(COLOURS), 2) ball centres on the table, in COLOUR_NAMES order
    target: int  # index into COLOUR_NAMES of the ball success is judged on
    decoy: int  # another ball, named instead of the target when the instruction is swapped
    phrasing: int  # which instruction template


def _in_workspace(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(*WORKSPACE_X), rng.uniform(*WORKSPACE_Y)])


def sample_layout(seed: int, phrasings: int) -> EpisodeLayout:
    """The layout for `seed`: non-overlapping balls, a start pose away from them, a target and a decoy colour."""
    rng = np.random.default_rng([seed, 0x5EED])
    balls: list[np.ndarray] = []
    while len(balls) < len(COLOURS):
        candidate = _in_workspace(rng)
        if all(np.linalg.norm(candidate - b) >= BALL_MIN_GAP for b in balls):
            balls.append(candidate)
    start = _in_workspace(rng)
    while min(np.linalg.norm(start - b) for b in balls) < START_MIN_GAP:
        start = _in_workspace(rng)
    joints = inverse_kinematics(start, elbow_sign=1.0 if rng.random() < 0.5 else -1.0)
    target = int(rng.integers(len(COLOURS)))
    decoy = int((target + rng.integers(1, len(COLOURS))) % len(COLOURS))
    return EpisodeLayout(
        joints=joints, balls=np.stack(balls), target=target, decoy=decoy, phrasing=int(rng.integers(phrasings))
    )


def inverse_kinematics(point: np.ndarray, elbow_sign: float) -> np.ndarray:
    """Closed-form joint angles that put the fingertip at `point` (x, y), elbow bent to the side of `elbow_sign`."""
    x, y = float(point[0]), float(point[1])
    cos_elbow = (x * x + y * y - LINK1**2 - LINK2**2) / (2 * LINK1 * LINK2)
    elbow = elbow_sign * float(np.arccos(np.clip(cos_elbow, -1.0, 1.0)))
    shoulder = np.arctan2(y, x) - np.arctan2(LINK2 * np.sin(elbow), LINK1 + LINK2 * np.cos(elbow))
    return np.array([shoulder, elbow])


def fingertip_jacobian(joints: np.ndarray) -> np.ndarray:
    """d(fingertip x, y) / d(shoulder, elbow) of the planar two-link arm."""
    s, e = float(joints[0]), float(joints[0] + joints[1])
    return np.array(
        [
            [-LINK1 * np.sin(s) - LINK2 * np.sin(e), -LINK2 * np.sin(e)],
            [LINK1 * np.cos(s) + LINK2 * np.cos(e), LINK2 * np.cos(e)],
        ]
    )


def fenced(point: np.ndarray) -> np.ndarray:
    """`point` (x, y) moved to the nearest place inside the fingertip's allowed area (the camera's view)."""
    return np.array([np.clip(point[0], *FENCE_X), np.clip(point[1], *FENCE_Y)])


def joint_step_for(displacement: np.ndarray, joints: np.ndarray, damping: float = 0.02) -> np.ndarray:
    """Damped-least-squares joint change for a small fingertip displacement (stays finite near singularities)."""
    jac = fingertip_jacobian(joints)
    return jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(2), displacement)


def expert_step(fingertip: np.ndarray, ball: np.ndarray, gain: float, max_step: float) -> np.ndarray:
    """The expert's fingertip displacement for one tick: a fraction `gain` of the way to the ball, at most
    `max_step` long."""
    step = gain * (ball - fingertip)
    length = float(np.linalg.norm(step))
    return step if length <= max_step else step * (max_step / length)
