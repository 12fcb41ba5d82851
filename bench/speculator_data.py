"""Training text for the demo model's MLP speculator, from what every Python install holds: the
standard library's source (its tests, site-packages and the modules the editing benchmark
quotes left out: a drafter must not have learnt the functions it is measured on) and pydoc's
topics. About 30 MB of code and prose.

    python -m bench.speculator_data OUT_DIR
    baton train-speculator --model DEMO_DIR --data OUT_DIR ...
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

from bench.spec_decode import SOURCE_MODULES

SKIPPED_PARTS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}


def held_out(relative: Path) -> bool:
    """Whether a stdlib file is one the editing benchmark's prompts quote (or their tests)."""
    module = ".".join(relative.with_suffix("").parts)
    return module in SOURCE_MODULES or bool(SKIPPED_PARTS & set(relative.parts))


def write_data(out: Path) -> tuple[int, int]:
    """Copy the stdlib's sources (less the held-out ones) and pydoc's topics into `out`;
    returns (files, characters)."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    files, chars = 0, 0
    for source in sorted(stdlib.rglob("*.py")):
        relative = source.relative_to(stdlib)
        if held_out(relative):
            continue
        target = out / "stdlib" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        files, chars = files + 1, chars + source.stat().st_size
    text = "\n\n".join(topics[key] for key in sorted(topics))
    (out / "pydoc_topics.txt").write_text(text)
    return files + 1, chars + len(text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    files, chars = write_data(Path(args[0]))
    print(f"{files} files, {chars / 1e6:.1f} MB of text in {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
