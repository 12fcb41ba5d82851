"""`baton COMMAND --config FILE.yaml`: flags from a YAML file, as vLLM's `--config`
(common.config_file reads it). Its flags are placed right after the command word, before those
typed on the command line, so the command line wins."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import config_file
from launcher.command import UsageError


def with_config_file(argv: list[str], command: str, parser: argparse.ArgumentParser,
                     path: Path) -> list[str]:  # fmt: skip
    """`argv` with the flags of YAML file `path` inserted after `command` (the subcommand
    whose `parser` reads them)."""
    at = argv.index(command) + 1
    return [*argv[:at], *config_file_args(path, parser), *argv[at:]]


def config_file_args(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line words for the flags in YAML file `path`; UsageError naming the file
    and the key for anything `parser` would not take."""
    try:
        return config_file.config_file_args(path, parser)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
