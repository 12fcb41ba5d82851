"""What the `baton` subcommands share: the usage error, registering a subcommand, and finding
the model directory to load."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # argparse's exit status for a bad command line; also used for a bad request


class UsageError(Exception):
    """A problem with what the user asked for; reported as `error: ...` with exit status 2."""


def add_subcommand(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register subcommand `name`; its errors name it as `baton NAME`."""
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(prog=f"baton {name}")
    return sub


def resolve_model_dir(model: Path | None) -> Path:
    """The model directory to load: `model` if it is a model directory, else the demo model."""
    if model is None:
        from engine.models.demo import DemoModelUnavailableError, ensure_demo_model

        try:
            return ensure_demo_model()
        except DemoModelUnavailableError as exc:
            raise UsageError(str(exc)) from exc
    if not model.is_dir():
        raise UsageError(f"model directory not found: {model}")
    if not (model / "config.json").is_file():
        raise UsageError(f"not a Hugging Face model directory (no config.json): {model}")
    return model
