"""bench.demo_parts: the demo model cut into parts that travel one per device call, joined and
checked there (the conversion itself is tests/test_demo_model.py's)."""

import shutil

import pytest

from bench.demo_parts import join, split
from engine.models.demo import GGUF_FILENAME


def test_parts_join_back_into_the_file_and_damage_is_caught(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(bytes(range(256)) * 3)  # 768 bytes
    dirs = split(tmp_path / "here", source, part_bytes=300)
    assert [d.name for d in dirs] == [".gpu-demo0", ".gpu-demo1", ".gpu-demo2"]
    arrived = tmp_path / "there"
    arrived.mkdir()
    for d in dirs:  # one call each
        for f in d.iterdir():
            shutil.copy(f, arrived)
    out = join(arrived, tmp_path / "out", convert=False)
    assert (out / GGUF_FILENAME).read_bytes() == source.read_bytes()
    (arrived / "part1").write_bytes(b"x" * 300)
    with pytest.raises(SystemExit, match="does not match its sha256"):
        join(arrived, tmp_path / "out2", convert=False)
    (arrived / "part2").unlink()
    with pytest.raises(SystemExit, match=r"parts missing: \[2\]"):
        join(arrived, tmp_path / "out3", convert=False)
