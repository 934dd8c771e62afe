"""The checked-in generated code is what the pinned generator makes of proto/; the contract has what devices need."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_bridge.protogen import GENERATED_PACKAGE, REPO_ROOT, compare_trees, generate, main
from edge_runtime._proto.edgecloud.v1 import bridge_pb2, bridge_pb2_grpc

pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency (pip install -e '.[dev]')")

STALE = "generated code differs from proto/: run `make proto` (python -m cloud_bridge.protogen) and commit the result"


def test_checked_in_code_matches_the_proto(tmp_path):
    files = generate(tmp_path)
    assert {p.name for p in files} >= {"bridge_pb2.py", "bridge_pb2.pyi", "bridge_pb2_grpc.py", "__init__.py"}
    assert compare_trees(tmp_path / GENERATED_PACKAGE, REPO_ROOT / GENERATED_PACKAGE) == [], STALE


def test_the_imported_code_is_the_generated_code(tmp_path):
    # what Python actually imports (this tree, or an installed copy) must match the .proto too
    generate(tmp_path)
    imported = Path(bridge_pb2.__file__).resolve().parent
    assert Path(bridge_pb2_grpc.__file__).resolve().parent == imported
    assert compare_trees(tmp_path / GENERATED_PACKAGE / "edgecloud" / "v1", imported) == [], STALE


def test_a_changed_proto_is_detected(tmp_path):
    proto = tmp_path / "proto" / "edgecloud" / "v1"
    proto.mkdir(parents=True)
    source = (REPO_ROOT / "proto" / "edgecloud" / "v1" / "bridge.proto").read_text()
    (proto / "bridge.proto").write_text(source.replace("string draft_answer = 1;", "string draft = 1;"))
    generate(tmp_path / "out", proto_dir=tmp_path / "proto")
    problems = compare_trees(tmp_path / "out" / GENERATED_PACKAGE, REPO_ROOT / GENERATED_PACKAGE)
    assert any("bridge_pb2.py" in p for p in problems) and any("bridge_pb2.pyi" in p for p in problems)


def test_check_mode_passes_on_this_tree(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().err


def _fields(message: type) -> set[str]:
    return set(message.DESCRIPTOR.fields_by_name)


def test_the_contract_carries_what_an_escalation_needs():
    assert bridge_pb2.DESCRIPTOR.package == "edgecloud.v1"
    service = bridge_pb2.DESCRIPTOR.services_by_name["CloudBridge"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "ListModels"}
    assert methods["GenerateStream"].server_streaming and not methods["Generate"].server_streaming
    assert _fields(bridge_pb2.GenerateRequest) == {
        "request_id",
        "messages",
        "model",
        "sampling",
        "max_new_tokens",
        "escalation",
        "max_usd_per_million_input_tokens",
        "max_usd_per_million_output_tokens",
    }
    assert _fields(bridge_pb2.EscalationContext) >= {"draft_answer", "p_correct", "reason"}
    assert _fields(bridge_pb2.GenerateResponse) >= {"text", "finish_reason", "usage", "cost_usd", "model", "timings"}
    assert _fields(bridge_pb2.Usage) == {"prompt_tokens", "completion_tokens"}
    assert _fields(bridge_pb2.TextDelta) == {"text", "token_count"}
    # presence matters: "unset" (bridge default) and 0 (invalid) must be told apart
    assert bridge_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["max_new_tokens"].has_presence
    assert bridge_pb2.EscalationContext.DESCRIPTOR.fields_by_name["p_correct"].has_presence
