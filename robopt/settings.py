"""Settings from environment variables (ROBOPT_*); an explicit argument always wins over them."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where robopt keeps its data, which LLM it asks, and which database holds sessions."""

    model_config = SettingsConfigDict(env_prefix="ROBOPT_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("robopt")),
        description="Artifacts, zoo models, the session database and history live here (per user).",
    )
    llm: str | None = Field(
        default=None,
        description="Chat model as an init_chat_model spec, e.g. 'openai:gpt-4.1-mini'. "
        "Unset: the deterministic rule-based deciders are used.",
    )
    database_url: str | None = Field(
        default=None,
        description="Session checkpoints: 'sqlite:///path.db' (default: <data_dir>/robopt.sqlite) "
        "or a postgresql:// URL (needs the 'postgres' extra).",
    )
    threads: int = Field(default=0, ge=0, description="CPU threads for latency measurement; 0 = all cores.")
    sensitivity_budget_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds the analysis may spend measuring per-layer quantization sensitivity (fewer calibration "
        "samples when needed, skipped below 4); 0 turns it off.",
    )
    plugins: str = Field(
        default="",
        description="Comma-separated modules imported at start-up to register extra techniques or evaluators.",
    )

    def plugin_modules(self) -> list[str]:
        return [m.strip() for m in self.plugins.split(",") if m.strip()]

    @property
    def sqlite_path(self) -> Path | None:
        url = self.database_url
        if url is None:
            return self.data_dir / "robopt.sqlite"
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///"))
        return None

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def zoo_dir(self) -> Path:
        return self.data_dir / "zoo"

    def effective_threads(self) -> int:
        import os

        return self.threads or (os.cpu_count() or 1)


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (None values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
