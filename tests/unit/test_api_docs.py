"""docs/api.md: generated from the proto comments (scripts/gen_api_docs.py), which must
document every element and say which status codes each RPC returns."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

import qm.errors
from qm._proto.qm.v1 import task_queue_pb2
from qm.reasons import PROTO_PREFIX, Reason
from qm.server.servicer import error_status, status_code_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen_api_docs = _load_generator()


def domain_error_classes() -> list[type[qm.errors.QMError]]:
    found, todo = [], [qm.errors.QMError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_status_code_the_server_maps_errors_to_is_documented():
    """A client reading docs/api.md is never surprised by a code from the error map."""
    documented = gen_api_docs.rpc_errors(gen_api_docs.load_files())
    task_queue = set().union(*(codes for rpc, codes in documented.items() if rpc.startswith("TaskQueue.")))
    # status_code_for looks only at the error's class, so an uninitialised instance will do
    mapped = {status_code_for(cls.__new__(cls)).name for cls in domain_error_classes()}
    assert mapped <= task_queue, f"codes the servicer returns, not in docs/api.md: {mapped - task_queue}"


def test_every_reason_code_the_server_sends_is_a_documented_error_reason():
    """The error map's reasons are qm.v1.ErrorReason values (each documented: the generator
    refuses a value without a comment), all of them used, and qm.reasons.Reason mirrors them."""
    documented = {name.removeprefix(PROTO_PREFIX) for name in task_queue_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    mapped = {error_status(cls.__new__(cls))[1] for cls in domain_error_classes()}
    assert mapped == documented == set(Reason)
    assert "ErrorReason" in gen_api_docs.render(gen_api_docs.load_files())


def test_the_rpcs_documented_codes_are_the_ones_users_meet():
    documented = gen_api_docs.rpc_errors(gen_api_docs.load_files())
    assert {"INVALID_ARGUMENT", "UNAVAILABLE"} <= documented["TaskQueue.SubmitTask"]
    assert "NOT_FOUND" in documented["TaskQueue.GetTaskStatus"]
    assert "NOT_FOUND" in documented["TaskQueue.StreamTaskResults"]
    assert {"NOT_FOUND", "FAILED_PRECONDITION"} <= documented["TaskQueue.CancelTask"]


def write_proto(root: pathlib.Path, body: str) -> pathlib.Path:
    path = root / "qm" / "v1" / "api.proto"
    path.parent.mkdir(parents=True)
    path.write_text('syntax = "proto3";\n\npackage qm.v1;\n\n' + body)
    return root


def test_an_element_without_a_comment_is_refused_by_name(tmp_path):
    root = write_proto(tmp_path, "// A thing.\nmessage Thing {\n  // Documented.\n  string a = 1;\n"
                                 "  string b = 2;\n}\n")
    with pytest.raises(gen_api_docs.DocError, match=r"field Thing\.b"):
        gen_api_docs.render(gen_api_docs.load_files(root))


def test_an_error_block_must_name_real_status_codes(tmp_path):
    root = write_proto(tmp_path, """// Things.
service Things {
  // Gets a thing.
  //
  // Errors:
  // - NOT_THERE: when there is none.
  rpc GetThing(GetThingRequest) returns (GetThingResponse);
}
// Which thing.
message GetThingRequest {}
// The thing.
message GetThingResponse {}
""")
    with pytest.raises(gen_api_docs.DocError, match="NOT_THERE"):
        gen_api_docs.render(gen_api_docs.load_files(root))
