"""Build hook: generate the gRPC code of protos/kvfleet/*/*.proto with grpcio-tools.

The generated modules (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`) are written beside their .proto
files in the source tree, so editable installs and the wheel both carry them; they are ignored by
git and never edited by hand. Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_protos() -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).resolve().parent / "_proto"
    for proto in sorted((ROOT / "protos").glob("kvfleet/*/*.proto")):
        rel = proto.relative_to(ROOT).as_posix()
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}"]
        args += [f"--grpc_python_out={ROOT}", rel]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
