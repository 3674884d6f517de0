"""Agent prompts, kept as Markdown files beside this module and filled with string.Template ($name)."""

from __future__ import annotations

from importlib import resources
from string import Template


def load_prompt(name: str) -> str:
    """The raw text of prompts/<name>.md."""
    return resources.files(__package__).joinpath(f"{name}.md").read_text(encoding="utf-8")


def render_prompt(name: str, **values: object) -> str:
    """prompts/<name>.md with $placeholders substituted; a missing value raises KeyError."""
    return Template(load_prompt(name)).substitute({k: str(v) for k, v in values.items()})
