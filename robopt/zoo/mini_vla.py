"""mini-vla: a miniature OpenVLA-style vision-language-action model, behaviour-cloned on the "mini-vla" task.

Like OpenVLA, a vision encoder turns the camera image into patch tokens, a projector maps them into a
transformer backbone that also reads the instruction's token embeddings, and the model emits one discretized
action token per action dimension: logits over 256 uniform bins (here the fingertip's dx, dy for the tick).
Everything is plain torch.nn (Conv2d, Linear, LayerNorm, Embedding, matmul + softmax attention), so it exports
to ONNX and every Linear is visible to quantization and pruning tools.

Training: behaviour cloning on the scripted expert's demonstrations (training seeds < 1000; evaluation seeds
start at 1000), each frame relabelled with every ball's instruction and expert action, cross-entropy against
labels smoothed over neighbouring bins plus an auxiliary place-prediction loss; about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.robotics.minivla_scene import CAMERA_CENTRE, COLOUR_NAMES
from robopt.robotics.minivla_task import (
    CONTROL_HZ,
    IMAGE_SIZE,
    INSTRUCTION_LENGTH,
    VOCABULARY,
    MiniVlaTask,
    action_to_bins,
)
from robopt.robotics.rollout import Policy, expert_policy, run_episodes
from robopt.tools.threads import torch_threads
from robopt.zoo.cards import ZooEntry, register_entry

PIXEL_MEAN = 0.6  # of the rendered scene's pixels, mostly table
PIXEL_STD = 0.1
PATCH = 8  # pixels per patch side: a 64x64 image gives an 8x8 grid of patch tokens
POSITION_SCALE = 0.5  # of the sine-cosine position codes, relative to the projected patch features


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a GELU MLP, from Linear layers and matmuls.

    Both residual branches start at zero (their last Linear is zero-initialized), so each block starts as the
    identity; in this small-data regime that shortens the plateau before attention learns where to look.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax((q @ k.transpose(-2, -1)) * (head_dim**-0.5), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


def sincos_positions(grid: int, channels: int) -> torch.Tensor:
    """[1, grid*grid, channels] 2-D sine-cosine position codes (row-major): half the channels code the row,
    half the column, with frequencies from half a period across the image up to one period per two patches."""
    quarter = channels // 4
    frequencies = torch.logspace(0, math.log10(grid / 2), quarter)
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None] * frequencies[None, :] * math.pi
        parts += [torch.sin(angles), torch.cos(angles)]
    codes = torch.cat(parts, dim=1)
    return F.pad(codes, (0, channels - codes.shape[1])).unsqueeze(0)


class MiniVLA(nn.Module):
    """Image [B,3,H,W] in [0,1] + instruction ids [B,L] -> action-token logits [B, action_dim, action_bins].

    Vision encoder: three 2x2 stride-2 convolutions (a hierarchical patchifier: each token sees exactly its own
    8x8 patch) to an (H/8)x(W/8) grid of patch features. Projector: LayerNorm + 2-layer MLP into the backbone's
    width, then FiLM-modulated by the instruction (scale and shift from the mean word embedding, as in RT-1),
    plus 2-D sine-cosine-initialized position embeddings. Backbone: `depth` attention blocks over
    [patch tokens; instruction tokens; one query token per action dimension]. Head: LayerNorm + Linear to the
    bins, read at the action query tokens.
    """

    input_spec: ClassVar[InputSpec] = InputSpec(
        inputs=[
            TensorSpec(name="image", shape=[1, 3, IMAGE_SIZE, IMAGE_SIZE]),
            TensorSpec(name="instruction", shape=[1, INSTRUCTION_LENGTH], dtype="int64", high=len(VOCABULARY)),
        ],
        source="zoo",
    )

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        vision_width: int = 64,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        vocab_size: int = len(VOCABULARY),
        instruction_length: int = INSTRUCTION_LENGTH,
        action_dim: int = 2,
        action_bins: int = 256,
    ) -> None:
        super().__init__()
        if image_size % PATCH:
            raise ValueError(f"image_size must be a multiple of {PATCH}, got {image_size}")
        grid = image_size // PATCH
        self.vision = nn.Sequential(
            nn.Conv2d(3, 32, 2, stride=2),
            nn.GELU(),
            nn.Conv2d(32, vision_width, 2, stride=2),
            nn.GELU(),
            nn.Conv2d(vision_width, vision_width, 2, stride=2),
            nn.GELU(),
        )
        self.projector = nn.Sequential(
            nn.LayerNorm(vision_width), nn.Linear(vision_width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.vision_position = nn.Parameter(sincos_positions(grid, width) * POSITION_SCALE)
        self.word_embedding = nn.Embedding(vocab_size, width)
        self.word_position = nn.Parameter(torch.randn(1, instruction_length, width) * 0.02)
        self.film = nn.Linear(width, 2 * width)
        self.action_queries = nn.Parameter(torch.randn(1, action_dim, width) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_bins)
        self.action_dim = action_dim

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B, patches, width] projected patch tokens (before language conditioning)."""
        # Fixed normalization: the table is a near-uniform bright background, the objects small deviations from it.
        patches = self.vision((image - PIXEL_MEAN) / PIXEL_STD).flatten(2).transpose(1, 2)
        return self.projector(patches)

    def act(self, patch_tokens: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """Projected patch tokens + instruction ids -> action logits [B, action_dim, action_bins]."""
        return self.head(self.query_states(patch_tokens, instruction))

    def query_states(self, patch_tokens: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """The action query tokens' final (normalized) states [B, action_dim, width], which the head reads."""
        words = self.word_embedding(instruction)
        gamma, beta = self.film(words.mean(dim=1, keepdim=True)).chunk(2, dim=-1)
        patches = patch_tokens * (1 + gamma) + beta + self.vision_position
        queries = self.action_queries.expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([patches, words + self.word_position, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, -self.action_dim :])

    def forward(self, image: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        return self.act(self.encode_image(image), instruction)


# -- behaviour cloning -----------------------------------------------------------------------------------------

FIRST_EVALUATION_SEED = 1000  # seeds from here on are for evaluation only; training uses seeds below
DEMO_SEEDS = range(500)  # episodes the expert demonstrates (500 x 30 frames x 4 instructions = 60,000 samples)
STEPS = 800  # AdamW steps of FRAMES_PER_BATCH frames
FRAMES_PER_BATCH = 16  # x 4 instructions (one per ball) = 64 samples per step
LEARNING_RATE = 2e-3
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.01
AUXILIARY_WEIGHT = 5.0  # of the auxiliary loss: predicting fingertip and named-ball positions from the query tokens
PLACE_SCALE = 0.2  # m: positions are divided by this for the auxiliary targets
LABEL_SIGMA = 1.5  # bins: the label is a Gaussian over neighbouring bins, not a single bin
STEPS_PER_REPORT = 100  # progress events of the "train" stage: current/total optimizer steps, every 100 steps


class RelabelledFrames:
    """Camera frames, each labelled with the expert's action for every ball (hindsight relabelling).

    Every frame is a training sample once per ball: the instruction naming that ball, the expert's action toward
    it. The same image with different instructions and different actions is what teaches the model to read the
    instruction, and the frames of an episode aimed at one ball are off-trajectory states for the other three.
    Images are kept as uint8 (exact: they were rendered as bytes).
    """

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.instructions: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.places: list[np.ndarray] = []

    def record(self, task: MiniVlaTask, observation: object) -> None:
        image, _ = task.model_inputs(observation)
        balls = range(len(COLOUR_NAMES))
        self.images.append((image[0] * 255).round().to(torch.uint8))
        self.instructions.append(np.stack([task.instruction_naming(ball) for ball in balls]))
        self.actions.append(np.stack([task.expert_action_toward(ball) for ball in balls]))
        # Auxiliary targets per sample: where the fingertip is and where the named ball is.
        tip = task.fingertip()
        self.places.append(np.stack([np.concatenate([tip, ball]) for ball in task.ball_positions()]))

    def __len__(self) -> int:
        return len(self.images) * len(COLOUR_NAMES)

    def tensors(self, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [F,3,H,W] uint8, instructions [F*balls, L], labels [F*balls, action_dim], places
        [F*balls, 4]: fingertip and named ball (x, y), centred on the camera and scaled to about [-1, 1]);
        sample i shows image i // balls."""
        instructions = torch.from_numpy(np.concatenate(self.instructions))
        labels = torch.from_numpy(action_to_bins(np.concatenate(self.actions), bins))
        centre = np.tile(np.asarray(CAMERA_CENTRE), 2)
        places = torch.from_numpy(((np.concatenate(self.places) - centre) / PLACE_SCALE).astype(np.float32))
        return torch.stack(self.images), instructions, labels, places


def record_episodes(
    task: MiniVlaTask, frames: RelabelledFrames, drive: Policy, seeds: range, progress: Progress, stage: str
) -> None:
    """Run `seeds` with `drive` steering the robot, recording every frame the policy sees (relabelled)."""

    def recording(observation: object) -> np.ndarray:
        frames.record(task, observation)
        return drive(observation)

    run_episodes(task, recording, seeds, progress=progress, stage=stage)


def smoothed_targets(labels: torch.Tensor, bins: int, sigma: float = LABEL_SIGMA) -> torch.Tensor:
    """[N, D] bin indices -> [N, D, bins] target distributions: a normalized Gaussian around each label bin."""
    offsets = torch.arange(bins, dtype=torch.float32) - labels.unsqueeze(-1).to(torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum(dim=-1, keepdim=True)


def bin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [N, D, bins] logits against Gaussian-smoothed [N, D] label bins."""
    return -(smoothed_targets(labels, logits.shape[-1]) * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def fit(model: MiniVLA, frames: RelabelledFrames, seed: int, steps: int, progress: Progress) -> None:
    """`steps` AdamW steps (linear warm-up, cosine decay); each batch holds FRAMES_PER_BATCH frames in seeded
    random order, each frame with every ball's instruction. Progress every STEPS_PER_REPORT steps."""
    bins = model.head.out_features
    images, instructions, labels, places = frames.tensors(bins)
    balls = len(COLOUR_NAMES)
    # A training-only probe: from the query states, where are the fingertip and the named ball? Without this
    # auxiliary target the model sits for hundreds of steps on a plateau before attention finds both places
    # (the action depends on both at once); with it, learning starts at once. The probe is discarded.
    probe = nn.Linear(model.head.in_features * model.action_dim, 4)
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *probe.parameters()], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    order = torch.Generator().manual_seed(seed)
    queue = torch.empty(0, dtype=torch.long)
    model.train()
    progress.update("train", 0, steps, f"{len(labels)} relabelled expert samples")
    for step in range(1, steps + 1):
        if len(queue) < FRAMES_PER_BATCH:
            queue = torch.cat([queue, torch.randperm(len(images), generator=order)])
        batch, queue = queue[:FRAMES_PER_BATCH], queue[FRAMES_PER_BATCH:]
        samples = (batch[:, None] * balls + torch.arange(balls)).reshape(-1)
        # One image encoding per frame, shared by its instructions (the vision encoder sees no language).
        patch_tokens = model.encode_image(images[batch].to(torch.float32) / 255.0)
        states = model.query_states(patch_tokens.repeat_interleave(balls, dim=0), instructions[samples])
        auxiliary = F.mse_loss(probe(states.flatten(1)), places[samples])
        loss = bin_loss(model.head(states), labels[samples]) + AUXILIARY_WEIGHT * auxiliary
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % STEPS_PER_REPORT == 0 or step == steps:
            progress.update("train", step, steps, f"loss {loss.item():.3f}")
        else:
            progress.check()
    model.eval()


def train_mini_vla(
    seed: int,
    progress: Progress,
    architecture_kwargs: dict[str, Any],
    demo_seeds: range = DEMO_SEEDS,
    steps: int = STEPS,
) -> MiniVLA:
    """Behaviour cloning: the scripted expert demonstrates `demo_seeds` (each frame relabelled for every ball),
    then `steps` AdamW steps of cross-entropy on the action bins plus the auxiliary place loss.

    Deterministic for a seed (fixed data seeds, one thread, seeded init and sample order); the global RNG state
    is preserved.
    """
    if any(s >= FIRST_EVALUATION_SEED for s in demo_seeds):
        raise ValueError(f"mini-vla trains on seeds below {FIRST_EVALUATION_SEED}; evaluation seeds start there")
    task = MiniVlaTask(image_size=architecture_kwargs.get("image_size", IMAGE_SIZE))
    frames = RelabelledFrames()
    try:
        with torch.random.fork_rng(devices=[]), torch_threads(1):
            torch.manual_seed(seed)
            model = MiniVLA(**architecture_kwargs)
            record_episodes(task, frames, expert_policy(task), demo_seeds, progress, "demonstrations")
            fit(model, frames, seed, steps, progress)
    finally:
        task.close()
    return model.eval()


register_entry(
    ZooEntry(
        name="mini-vla",
        description="Miniature OpenVLA-style vision-language-action model: 64x64 camera image + instruction "
        "('reach the red ball') -> 2 action tokens of 256 bins; behaviour-cloned from a scripted expert on the "
        "mini-vla MuJoCo task, judged by closed-loop success.",
        architecture=f"{MiniVLA.__module__}:{MiniVLA.__qualname__}",
        architecture_kwargs={
            "image_size": IMAGE_SIZE,
            "vision_width": 64,
            "width": 128,
            "depth": 2,
            "heads": 4,
            "mlp_ratio": 2,
            "vocab_size": len(VOCABULARY),
            "instruction_length": INSTRUCTION_LENGTH,
            "action_dim": MiniVlaTask.action_dim,
            "action_bins": 256,
        },
        family="vision-language-action",
        input_spec=MiniVLA.input_spec,
        evaluator=EvaluatorSpec(name="closed-loop", dataset="mini-vla", options={"episodes": 30}),
        suggested_criteria={"max_size": "40%", "max_accuracy_drop": "15%", "control_rate": f"{CONTROL_HZ:g}Hz"},
        seed=0,
        train=train_mini_vla,
    )
)
