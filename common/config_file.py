"""`--config FILE.yaml`: flags from a YAML file, as vLLM's `--config`.

The file is a mapping whose keys are a command's long flag names, with `-` or `_`
(`max-model-len: 2048`, `enable_prefix_caching: false`). `config_file_args` turns it into
command-line words, which the caller places before those typed on the command line, so the
command line wins; argparse then types and checks each value as it does a typed one. An unknown
key is an error naming it. A flag that takes JSON (metavar `JSON`, e.g.
`structured-outputs-config`) takes a mapping too. `baton serve` and the worker services
(`python -m prefill_service` / `decode_service`, the Helm chart's engine ConfigMap) read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def config_file_args(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line words for the flags in YAML file `path`; ValueError naming the file
    and the key for anything `parser` would not take."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    words: list[str] = []
    for key, value in data.items():
        try:
            words += _flag_words(parser, str(key), value)
        except ValueError as exc:
            raise ValueError(f"--config {path}: {exc}") from exc
    return words


def _flag_words(parser: argparse.ArgumentParser, key: str, value: Any) -> list[str]:
    """The words that give flag `key` the YAML `value` (none for null: the default stays)."""
    option = "--" + key.replace("_", "-")
    action = parser._option_string_actions.get(option)  # argparse has no public lookup
    if action is None or option in ("--config", "--help"):
        raise ValueError(f"unknown key {key!r} (keys are the command's long flag names)")
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if option != action.option_strings[0]:
            raise ValueError(f"{key}: write {action.option_strings[0][2:]}: false instead")
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return [option if value else "--no-" + option[2:]]
    if isinstance(value, dict) and action.metavar == "JSON":
        return [option, json.dumps(value)]
    if isinstance(value, (dict, list)):
        raise ValueError(f"{key}: expected a single value, got {value!r}")
    return [option, _word(value)]


def _word(value: Any) -> str:
    """A YAML scalar as the command line would spell it (booleans as YAML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
