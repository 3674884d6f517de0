"""Generate robopt's local lm-eval task: complete a line of held-out Python standard library code.

Each item: `context` = a few real lines of a held-out module plus the start of the next line (cut after a space),
`choices` = the true rest of that line and 3 distractor line endings of similar length taken from the other
held-out modules, `label` = the true ending's index. Completing a started line is local enough for a tiny model
to beat chance clearly; picking a whole next line among 4 was not (tiny-lm scored about 0.29 there).

Deterministic (fixed seed, fixed held-out modules): on the same Python minor version the JSONL comes out
byte-identical.

    .venv/bin/python scripts/make_lm_task.py [--items 150] [--seed 0] [--out robopt/evaluation/lm_tasks/....jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from robopt.evaluation.language_model import LM_TASK_NAME, LM_TASKS_DIR
from robopt.evaluation.text_corpus import heldout_sources

CONTEXT_LINES = 6
MIN_LINE_CHARS = 20  # stripped line length
MAX_LINE_CHARS = 100
MIN_PREFIX_CHARS = 4  # after the indentation
MIN_ENDING_CHARS = 8
LENGTH_RATIO = 1.25  # distractor endings are within this factor of the true ending's length
CHOICES = 4


def _cuts(line: str) -> list[int]:
    """Positions just after a space where the line may be cut (a prefix of code, then a real ending)."""
    indent = len(line) - len(line.lstrip())
    return [
        i + 1
        for i, char in enumerate(line)
        if char == " "
        and i + 1 - indent >= MIN_PREFIX_CHARS
        and len(line[i + 1 :].strip()) >= MIN_ENDING_CHARS
        and line[i + 1] != " "
    ]


def _eligible(line: str) -> bool:
    return MIN_LINE_CHARS <= len(line.strip()) <= MAX_LINE_CHARS and bool(_cuts(line))


def make_items(count: int, seed: int) -> list[dict]:
    """`count` items from the held-out modules, in module and line order."""
    rng = random.Random(seed)
    sources = {name: source.split("\n") for name, source in heldout_sources().items()}
    targets = [
        (name, i)
        for name, lines in sources.items()
        for i in range(CONTEXT_LINES, len(lines))
        if _eligible(lines[i]) and sum(bool(x.strip()) for x in lines[i - CONTEXT_LINES : i]) >= CONTEXT_LINES - 2
    ]
    endings = sorted({(name, line[cut:]) for name, lines in sources.items() for line in lines for cut in _cuts(line)})
    items = []
    for name, i in sorted(rng.sample(targets, count)):
        line = sources[name][i]
        cut = rng.choice(_cuts(line))
        true = line[cut:]
        candidates = sorted(
            {
                ending
                for other, ending in endings
                if other != name
                and ending != true
                and len(true) / LENGTH_RATIO <= len(ending) <= len(true) * LENGTH_RATIO
            }
        )
        choices = [true, *rng.sample(candidates, CHOICES - 1)]
        rng.shuffle(choices)
        items.append(
            {
                "id": f"{name}:{i + 1}:{cut}",
                "context": "\n".join(sources[name][i - CONTEXT_LINES : i]) + "\n" + line[:cut],
                "choices": choices,
                "label": choices.index(true),
            }
        )
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=LM_TASKS_DIR / f"{LM_TASK_NAME}.jsonl")
    args = parser.parse_args()
    items = make_items(args.items, args.seed)
    args.out.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
