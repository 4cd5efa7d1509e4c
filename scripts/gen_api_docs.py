#!/usr/bin/env python3
"""Generate docs/api.md, the reference of the public API (package qm.v1), from the
comments in protos/qm/v1/*.proto; `--check` fails if docs/api.md is stale.

The descriptors are read with their source info (comments) from protoc of grpcio-tools,
the compiler scripts/gen_protos.py uses, so the reference says what the .proto files
say. The comments follow two conventions, enforced here:

- every service, RPC, message, field, enum and enum value has a comment (leading, or
  trailing on the same line): its meaning, its unit, and what an unset value means;
- the comment of an RPC, or of a service for all its RPCs, may end with an error block:

      Errors:
      - INVALID_ARGUMENT: when this happens
        (continuation lines are indented)

  one item per gRPC status code the RPC returns, named as grpc.StatusCode names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "qm.v1"
OUTPUT = ROOT / "docs" / "api.md"

# Field numbers of the descriptor messages, as source info paths use them.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED = 2, 3
ENUM_VALUE = 2
SERVICE_METHOD = 2

FieldType = descriptor_pb2.FieldDescriptorProto
SCALAR_NAMES = {
    FieldType.TYPE_DOUBLE: "double", FieldType.TYPE_FLOAT: "float", FieldType.TYPE_INT64: "int64",
    FieldType.TYPE_UINT64: "uint64", FieldType.TYPE_INT32: "int32", FieldType.TYPE_FIXED64: "fixed64",
    FieldType.TYPE_FIXED32: "fixed32", FieldType.TYPE_BOOL: "bool", FieldType.TYPE_STRING: "string",
    FieldType.TYPE_BYTES: "bytes", FieldType.TYPE_UINT32: "uint32", FieldType.TYPE_SFIXED32: "sfixed32",
    FieldType.TYPE_SFIXED64: "sfixed64", FieldType.TYPE_SINT32: "sint32", FieldType.TYPE_SINT64: "sint64",
}
STATUS_CODES = {code.name for code in grpc.StatusCode} - {"OK"}


class DocError(Exception):
    """The .proto comments break a convention above; the message says where."""


@dataclasses.dataclass
class Doc:
    """One element's comment: its description, and the error items of an RPC or service."""

    text: str
    errors: list[tuple[str, str]]


def load_files(proto_root: pathlib.Path = PROTO_ROOT) -> list[descriptor_pb2.FileDescriptorProto]:
    """The qm.v1 files under proto_root, compiled with their comments."""
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    sources = sorted((proto_root / PACKAGE.replace(".", "/")).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "api.binpb"
        args = ["protoc", f"-I{proto_root}", f"-I{include}", "--include_source_info",
                f"--descriptor_set_out={out}", *map(str, sources)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    wrong = [f.name for f in files if f.package != PACKAGE]
    if wrong:
        raise DocError(f"{', '.join(wrong)}: not in package {PACKAGE}")
    return list(files)


class Comments:
    """The comments of one file, looked up by the element's source info path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.file = file.name
        self._by_path = {tuple(loc.path): loc.leading_comments or loc.trailing_comments
                         for loc in file.source_code_info.location}
        self.missing: list[str] = []

    def doc(self, path: tuple[int, ...], what: str) -> Doc:
        raw = self._by_path.get(path, "")
        lines = [line[1:] if line.startswith(" ") else line for line in raw.rstrip().split("\n")]
        if not raw.strip():
            self.missing.append(f"{self.file}: {what}")
            return Doc("", [])
        return _split_errors(lines, f"{self.file}: {what}")


def _split_errors(lines: list[str], where: str) -> Doc:
    if "Errors:" not in lines:
        return Doc("\n".join(lines).strip(), [])
    start = lines.index("Errors:")
    errors: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("- "):
            code, colon, when = line[2:].partition(":")
            if not colon or code.strip() not in STATUS_CODES:
                raise DocError(f"{where}: {line!r} is not '- CODE: when' with CODE one of "
                               f"{', '.join(sorted(STATUS_CODES))}")
            errors.append([code.strip(), when.strip()])
        elif line.startswith("  ") and errors:
            errors[-1][1] += " " + line.strip()
        elif line.strip():
            raise DocError(f"{where}: {line!r} in an Errors: block is neither '- CODE: when' nor indented")
    return Doc("\n".join(lines[:start]).strip(), [(code, when) for code, when in errors])


def paragraphs(text: str) -> str:
    """Comment lines joined into Markdown paragraphs (a blank line separates them)."""
    blocks = [" ".join(line.strip() for line in block.split("\n")) for block in text.split("\n\n")]
    return "\n\n".join(block for block in blocks if block)


def cell(text: str) -> str:
    """Comment text fit for one table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def local_name(type_name: str) -> str:
    return type_name.removeprefix(f".{PACKAGE}.")


def type_link(type_name: str) -> str:
    """A message or enum type: a link to it if it is ours, else its full name."""
    if type_name.startswith(f".{PACKAGE}."):
        name = local_name(type_name)
        return f"[{name}](#{name.lower()})"
    return f"`{type_name.lstrip('.')}`"


def field_type(field: descriptor_pb2.FieldDescriptorProto,
               map_entries: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    def single(f: descriptor_pb2.FieldDescriptorProto) -> str:
        return f"`{SCALAR_NAMES[f.type]}`" if f.type in SCALAR_NAMES else type_link(f.type_name)

    if field.type_name in map_entries:
        key, value = map_entries[field.type_name].field
        return f"map<{single(key)}, {single(value)}>"
    if field.label == FieldType.LABEL_REPEATED:
        return f"repeated {single(field)}"
    if field.proto3_optional:
        return f"optional {single(field)}"
    return single(field)


def unset_value(field: descriptor_pb2.FieldDescriptorProto, map_entries: dict,
                enums: dict[str, descriptor_pb2.EnumDescriptorProto]) -> str:
    """What a reader of the message sees when the sender left the field out."""
    if field.label == FieldType.LABEL_REPEATED:
        return "empty"
    if field.proto3_optional or field.type == FieldType.TYPE_MESSAGE:
        return "not set"
    if field.type == FieldType.TYPE_ENUM:
        return f"`{enums[field.type_name].value[0].name}`"
    return {FieldType.TYPE_STRING: '`""`', FieldType.TYPE_BYTES: "empty",
            FieldType.TYPE_BOOL: "`false`"}.get(field.type, "`0`")


def render_rpc(method: descriptor_pb2.MethodDescriptorProto, doc: Doc) -> list[str]:
    request = ("stream " if method.client_streaming else "") + type_link(method.input_type)
    response = ("stream " if method.server_streaming else "") + type_link(method.output_type)
    out = [f"#### {method.name}", "", f"rpc {method.name}({request}) returns ({response})", "",
           paragraphs(doc.text), ""]
    if doc.errors:
        out += ["| Status code | When |", "| --- | --- |"]
        out += [f"| `{code}` | {cell(when)} |" for code, when in doc.errors]
    else:
        out.append("No status codes of its own; only those every RPC of the service can return.")
    return out + [""]


def render_service(service: descriptor_pb2.ServiceDescriptorProto, index: int,
                   comments: Comments) -> list[str]:
    path = (FILE_SERVICE, index)
    doc = comments.doc(path, f"service {service.name}")
    out = [f"### {service.name}", "", f"`{PACKAGE}.{service.name}`, in "
           f"[{comments.file}](../protos/{comments.file}).", "", paragraphs(doc.text), ""]
    if doc.errors:
        out += ["Every RPC of this service can also end with:", "", "| Status code | When |", "| --- | --- |"]
        out += [f"| `{code}` | {cell(when)} |" for code, when in doc.errors]
        out.append("")
    out += ["| RPC | Request | Response |", "| --- | --- | --- |"]
    for method in service.method:
        out.append(f"| [{method.name}](#{method.name.lower()}) | "
                   f"{'stream ' if method.client_streaming else ''}{type_link(method.input_type)} | "
                   f"{'stream ' if method.server_streaming else ''}{type_link(method.output_type)} |")
    out.append("")
    for number, method in enumerate(service.method):
        doc = comments.doc(path + (SERVICE_METHOD, number), f"rpc {service.name}.{method.name}")
        out += render_rpc(method, doc)
    return out


def render_message(message: descriptor_pb2.DescriptorProto, index: int, comments: Comments,
                   map_entries: dict, enums: dict) -> list[str]:
    path = (FILE_MESSAGE, index)
    for nested in message.nested_type:
        if not nested.options.map_entry:
            raise DocError(f"{comments.file}: nested message {message.name}.{nested.name}: not supported "
                           "here; declare it at the top level")
    doc = comments.doc(path, f"message {message.name}")
    out = [f"### {message.name}", "", paragraphs(doc.text), ""]
    if not message.field:
        return out + ["No fields.", ""]
    out += ["| Field | Type | Unset | Description |", "| --- | --- | --- | --- |"]
    for number, field in enumerate(message.field):
        field_doc = comments.doc(path + (MESSAGE_FIELD, number), f"field {message.name}.{field.name}")
        out.append(f"| `{field.name}` = {field.number} | {field_type(field, map_entries)} | "
                   f"{unset_value(field, map_entries, enums)} | {cell(field_doc.text)} |")
    return out + [""]


def render_enum(enum: descriptor_pb2.EnumDescriptorProto, index: int, comments: Comments) -> list[str]:
    path = (FILE_ENUM, index)
    doc = comments.doc(path, f"enum {enum.name}")
    out = [f"### {enum.name}", "", paragraphs(doc.text), "",
           "| Value | Number | Meaning |", "| --- | --- | --- |"]
    for number, value in enumerate(enum.value):
        value_doc = comments.doc(path + (ENUM_VALUE, number), f"enum value {value.name}")
        out.append(f"| `{value.name}` | {value.number} | {cell(value_doc.text)} |")
    return out + [""]


def rpc_errors(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, set[str]]:
    """The status codes documented for each RPC ("TaskQueue.SubmitTask"), its service's included."""
    codes: dict[str, set[str]] = {}
    for file in files:
        comments = Comments(file)
        for index, service in enumerate(file.service):
            common = {code for code, _ in comments.doc((FILE_SERVICE, index), service.name).errors}
            for number, method in enumerate(service.method):
                doc = comments.doc((FILE_SERVICE, index, SERVICE_METHOD, number), method.name)
                codes[f"{service.name}.{method.name}"] = common | {code for code, _ in doc.errors}
    return codes


HEADER = f"""# QueueMaster API reference ({PACKAGE})

<!-- Generated from protos/qm/v1/*.proto by scripts/gen_api_docs.py: edit the .proto
comments, then run the script. scripts/test checks that this file is current. -->

The gRPC API of QueueMaster, package `{PACKAGE}`: what any client (the `qm` command,
`qm.Client`, or a client generated in any language from [`protos/`](../protos)) calls.
Generated from the comments in the .proto files. How the contract is checked and how to
change it: [architecture.md, "API contract"](architecture.md#api-contract).

Conventions: field names carry their unit (`_s` seconds, `_mb` MiB, `_bytes` bytes);
counts are plain numbers. proto3 sends no value for a field left at its default: the
"Unset" column shows what a reader then sees (`0`, `""`, `false`, the enum's zero value,
empty; "not set" for messages and `optional` fields, whose presence is visible), and the
description says what that means, e.g. "0 = the task type's default". Times are
`google.protobuf.Timestamp` (UTC). Every RPC lists the status codes it can return besides
`OK`; the service lists those any of its RPCs can return.
"""


def render(files: list[descriptor_pb2.FileDescriptorProto]) -> str:
    enums = {f".{PACKAGE}.{enum.name}": enum for file in files for enum in file.enum_type}
    map_entries = {f".{PACKAGE}.{message.name}.{nested.name}": nested
                   for file in files for message in file.message_type
                   for nested in message.nested_type if nested.options.map_entry}
    all_comments = [Comments(file) for file in files]
    services, messages, enum_sections = [], [], []
    for file, comments in zip(files, all_comments):
        for index, service in enumerate(file.service):
            services += render_service(service, index, comments)
        for index, message in enumerate(file.message_type):
            messages += render_message(message, index, comments, map_entries, enums)
        for index, enum in enumerate(file.enum_type):
            enum_sections += render_enum(enum, index, comments)
    missing = [entry for comments in all_comments for entry in comments.missing]
    if missing:
        raise DocError("no comment on:\n  " + "\n  ".join(missing))
    text = "\n".join([HEADER, "## Services", "", *services, "## Messages", "", *messages, "## Enums", "",
                      *enum_sections])
    return text.rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is not current")
    args = parser.parse_args()
    try:
        text = render(load_files())
    except DocError as exc:
        print(f"gen_api_docs: {exc}", file=sys.stderr)
        return 1
    relative = OUTPUT.relative_to(ROOT)
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{relative} is stale; run scripts/gen_api_docs.py")
            return 1
        print(f"{relative} is current")
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
