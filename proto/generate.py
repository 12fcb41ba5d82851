"""Regenerate the Python stubs of `proto/baton/v1/*.proto` (run: `python -m proto.generate`).

The stubs live beside the .proto files and are committed. Imports inside them are made
package-relative (`from proto.baton.v1 import common_pb2`) so they work without sys.path tricks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # holds baton/v1/*.proto
PACKAGE_DIR = PROTO_ROOT / "baton" / "v1"


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) into `out_root`/baton/v1; return the files written."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = sorted((out_root / "baton" / "v1").glob("*_pb2*.py*"))
    for path in written:
        text = re.sub(
            r"^from baton\.v1 import (\w+)",
            r"from proto.baton.v1 import \1",
            path.read_text(),
            flags=re.M,
        )
        path.write_text(text)
    return written


# What the generator writes of its own version: protoc's (the gencode's runtime check) and
# grpcio-tools' (GRPC_GENERATED_VERSION). A patch release of either changes only these.
_GENERATOR_VERSIONS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (
        re.compile(
            r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)"
            r"\s*\d+,\s*\d+,\s*\d+,"
        ),
        r"\1 X, X, X,",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
)


def without_generator_versions(text: str) -> str:
    """`text` of a generated stub with the generator's version numbers masked, so two stubs
    compare equal when only the protoc or grpcio-tools release that wrote them differs."""
    for pattern, replacement in _GENERATOR_VERSIONS:
        text = pattern.sub(replacement, text)
    return text


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)
