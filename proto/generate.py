"""Regenerate the committed protobuf/gRPC modules from the `.proto` files in this folder.

Run ``python -m tidelog.proto.generate`` after editing a ``.proto`` file. The mapping
``-I tidelog/proto=<this folder>`` makes protoc see the files under the virtual path
``tidelog/proto/``, so generated modules import each other as ``tidelog.proto.x_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and return the generated files (flat, by name)."""
    from grpc_tools import protoc  # only a dev/test dependency

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-Itidelog/proto={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"tidelog/proto/{p.name}" for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        produced = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "tidelog" / "proto").iterdir()):
            if path.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / path.name
                shutil.copyfile(path, target)
                produced.append(target)
        return produced


def committed_files() -> list[Path]:
    return sorted(p for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    for stale in committed_files():
        stale.unlink()
    for path in generate(PROTO_DIR):
        print(f"wrote {path.relative_to(PROTO_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
