"""The command that reproduces a benchmark, rebuilt from its parsed arguments.

Every option is written out with its value, defaults included, so the recorded command still
means the same after defaults change. Secrets (`--api-key`) are left out.
"""

from __future__ import annotations

import argparse
import shlex

SECRET_DESTS = frozenset({"api_key"})


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str) -> str:
    """`prefix` (e.g. 'baton bench run') followed by every option of `parser` as set in `args`."""
    words = shlex.split(prefix)
    positionals: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in SECRET_DESTS:
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            positionals += [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            words += _option_words(action, value)
    return shlex.join(words + positionals)


def _option_words(action: argparse.Action, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[int(not value)]]  # ["--flag", "--no-flag"]
    flag = max(action.option_strings, key=len)
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, list):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]
