"""Run-time settings for one graph run (LangGraph context schema); explicit values beat environment settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robopt.settings import Settings, get_settings


@dataclass(kw_only=True)
class Context:
    """Settings of one run. Unset fields fall back to ROBOPT_* environment settings."""

    data_dir: str | None = field(default=None, metadata={"description": "Data directory (artifacts, zoo, history)."})
    llm: str | None = field(
        default=None,
        metadata={"description": "init_chat_model spec, e.g. 'openai:gpt-4.1-mini'. None: deterministic deciders."},
    )
    chat_model: Any = field(
        default=None,
        metadata={"description": "A ready chat model instance (Python API and tests); overrides llm."},
    )
    threads: int = field(default=0, metadata={"description": "CPU threads for latency measurement; 0 = all cores."})
    max_attempts: int = field(default=12, metadata={"description": "Stop after this many applied steps."})
    max_replans: int = field(default=8, metadata={"description": "Stop after this many replans."})
    seed: int = field(default=0, metadata={"description": "Seed for example inputs and techniques."})
    isolated_measurement: bool = field(
        default=True,
        metadata={
            "description": "Measure latency and peak memory in a fresh process (about 3 s per model); "
            "False times latency in-process and skips memory."
        },
    )
    cancel: Any = field(default=None, metadata={"description": "A threading.Event that cancels the run when set."})

    def settings(self) -> Settings:
        return get_settings(data_dir=self.data_dir, llm=self.llm, threads=self.threads or None)

    def llm_enabled(self) -> bool:
        return self.chat_model is not None or bool(self.settings().llm)
