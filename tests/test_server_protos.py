"""The committed stubs in server/pb/ are exactly what protos/build.py generates from protos/."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    spec = importlib.util.spec_from_file_location("protos_build", ROOT / "protos" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerated_stubs_match_committed(tmp_path):
    generated = _build_module().build(tmp_path)
    names = sorted(p.name for p in generated)
    committed = sorted(p.name for p in (ROOT / "server" / "pb" / "deltaserve" / "v1").glob("*_pb2*.py"))
    assert names == committed, f"stub files differ: generated {names}, committed {committed}"
    for path in generated:
        mine = (ROOT / "server" / "pb" / "deltaserve" / "v1" / path.name).read_text()
        assert path.read_text() == mine, f"server/pb/deltaserve/v1/{path.name} is stale: run python protos/build.py"


def test_every_message_and_field_is_documented():
    for proto in sorted((ROOT / "protos" / "deltaserve" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_decl = (s.startswith(("message ", "enum ", "rpc ", "service "))
                       or (s.endswith(";") and "=" in s and not s.startswith(("syntax", "option"))))
            if is_decl:
                prev = lines[i - 1].strip()
                assert prev.startswith("//"), f"{proto.name}:{i + 1}: {s!r} has no comment above it"


def test_stubs_import_relative_and_expose_services():
    from server.pb import deltas_pb2_grpc, inference_pb2, inference_pb2_grpc, tenants_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "deltaserve.v1"
    assert hasattr(inference_pb2_grpc, "InferenceServicer")
    assert hasattr(deltas_pb2_grpc, "DeltasServicer") and hasattr(tenants_pb2_grpc, "TenantsServicer")
    # relative imports: the generated package never needs a top-level `deltaserve` module
    assert "deltaserve.v1" not in sys.modules
