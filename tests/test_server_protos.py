"""The committed stubs in server/pb/ are exactly what protos/build.py generates from protos/, and the limits
the protos document are the ones the server enforces."""
import importlib.util
import re
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


def test_documented_limits_are_the_enforced_ones():
    from delta_store.importer import LABEL_KEY_CHARS, LABEL_VALUE_CHARS
    from server.edge.generation import MAX_REQUEST_ID_CHARS
    from server.types import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
    from tests.helpers import store_settings

    deltas = " ".join((ROOT / "protos" / "deltaserve" / "v1" / "deltas.proto").read_text().split())
    labels = re.search(r"labels kept with the version: at most (\d+) pairs, keys of 1-(\d+) characters, /// values "
                       r"of at most (\d+) characters", deltas)
    settings = store_settings()
    assert labels and tuple(map(int, labels.groups())) == (settings.max_labels, LABEL_KEY_CHARS, LABEL_VALUE_CHARS)
    description = re.search(r"Free text kept with the version, at most (\d+) characters", deltas)
    assert description and int(description.group(1)) == settings.max_description
    inference = " ".join((ROOT / "protos" / "deltaserve" / "v1" / "inference.proto").read_text().split())
    stops = re.search(r"token is included in token_ids, not in text\); /// at most (\d+)\..*?these strings; at most "
                      r"(\d+), of at most (\d+) /// characters", inference)
    assert stops and tuple(map(int, stops.groups())) == (MAX_STOP_TOKEN_IDS, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
    assert f"(at most {MAX_REQUEST_ID_CHARS} characters)" in inference
