"""Regenerate the Python stubs of protos/deltaserve/v1/*.proto into server/pb/deltaserve/v1/.

protoc writes absolute imports (``from deltaserve.v1 import common_pb2``); they are rewritten to
relative ones so the stubs live inside the ``server.pb`` package (the TGI ``sed`` step).
Usage: ``python protos/build.py [--out DIR]``; tests/test_server_protos.py checks the committed stubs.
"""
import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc
from importlib.resources import files

ROOT = Path(__file__).resolve().parent


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deltaserve" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"-I{files('grpc_tools') / '_proto'}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + protos) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    generated = sorted((out / "deltaserve" / "v1").glob("*_pb2*.py"))
    for path in generated:
        text = re.sub(r"^from deltaserve\.v1 import ", "from . import ", path.read_text(), flags=re.M)
        path.write_text(text)
    return generated


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT.parent / "server" / "pb")
    for p in build(parser.parse_args().out):
        print(p, file=sys.stderr)
