"""The anvil.v1 protos document themselves for readers in any language: every service, rpc, message,
field, enum and enum value has a comment; DataBatch's comment lists every Arrow column with its type;
ForwardRequest.loss_fn lists every loss with its columns; docs/grpc.md carries the same column table.

Comments are read the way other languages' generators read them: from protoc's source info."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from learner.losses import LOSSES
from protos.arrow_schemas import BATCH_SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = sorted(str(path.relative_to(PROTO_ROOT)) for path in (PROTO_ROOT / "anvil" / "v1").glob("*.proto"))

# Field numbers of descriptor.proto, which make up source-info paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE, SERVICE_METHOD = 2, 2


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "anvil.binpb"
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", "--include_source_info", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, *PROTO_FILES]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def comments_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(location.path): location.leading_comments.strip() for location in file.source_code_info.location}


def documented_elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, source path) of every element a reader needs explained."""

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str):
        name = f"{prefix}{msg.name}"
        yield name, path
        for i, field in enumerate(msg.field):
            yield f"{name}.{field.name}", (*path, MESSAGE_FIELD, i)
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:  # map<k, v> fields are documented on the field
                yield from message(nested, (*path, MESSAGE_NESTED, i), f"{name}.")
        for i, nested_enum in enumerate(msg.enum_type):
            yield from enum(nested_enum, (*path, MESSAGE_ENUM, i), f"{name}.")

    def enum(en: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str):
        yield f"{prefix}{en.name}", path
        for i, value in enumerate(en.value):
            yield f"{prefix}{en.name}.{value.name}", (*path, ENUM_VALUE, i)

    for i, msg in enumerate(file.message_type):
        yield from message(msg, (FILE_MESSAGE, i), "")
    for i, en in enumerate(file.enum_type):
        yield from enum(en, (FILE_ENUM, i), "")
    for i, service in enumerate(file.service):
        yield service.name, (FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"{service.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def test_every_element_of_the_contract_has_a_comment(descriptor_set):
    undocumented = []
    for file in descriptor_set.file:
        if not file.name.startswith("anvil/v1/"):
            continue
        comments = comments_by_path(file)
        undocumented += [f"{file.name}: {name}" for name, path in documented_elements(file) if not comments.get(path)]
    assert not undocumented, "add a comment to:\n" + "\n".join(undocumented)


def test_every_rpc_lists_its_status_codes_including_auth(descriptor_set):
    for file in descriptor_set.file:
        comments = comments_by_path(file)
        for i, service in enumerate(file.service):
            for j, method in enumerate(service.method):
                comment = comments[(FILE_SERVICE, i, SERVICE_METHOD, j)]
                assert "Errors include:" in comment and "UNAUTHENTICATED" in comment, method.name


def arrow_type_name(arrow_type: pa.DataType) -> str:
    """The spelling the docs use: int32, int64, float32, list<int32>, list<float32>."""
    if pa.types.is_list(arrow_type):
        return f"list<{arrow_type_name(arrow_type.value_type)}>"
    return {pa.float32(): "float32", pa.float64(): "float64"}.get(arrow_type, str(arrow_type))


def message_comment(descriptor_set, file_name: str, message: str, field: str | None = None) -> str:
    (file,) = [f for f in descriptor_set.file if f.name == file_name]
    index = [m.name for m in file.message_type].index(message)
    path = (FILE_MESSAGE, index)
    if field is not None:
        path += (MESSAGE_FIELD, [f.name for f in file.message_type[index].field].index(field))
    return comments_by_path(file)[path]


def test_data_batch_comment_and_docs_list_every_column_with_its_type(descriptor_set):
    comment = message_comment(descriptor_set, "anvil/v1/common.proto", "DataBatch")
    guide = (REPO_ROOT / "docs" / "grpc.md").read_text()
    for field in BATCH_SCHEMA:
        type_name = arrow_type_name(field.type)
        assert re.search(rf"^\s*{field.name}\s+{re.escape(type_name)}\s", comment, re.MULTILINE), field.name
        assert re.search(rf"^\| `{field.name}` \| `{re.escape(type_name)}` \|", guide, re.MULTILINE), field.name


def test_loss_fn_comment_lists_every_loss_with_its_columns(descriptor_set):
    comment = message_comment(descriptor_set, "anvil/v1/learner.proto", "ForwardRequest", "loss_fn")
    for name, spec in LOSSES.items():
        line = re.search(rf"^\s*{name}\s+(.+)$", comment, re.MULTILINE)
        assert line, f"loss {name} is not listed"
        assert all(column in line.group(1) for column in spec.inputs), (name, sorted(spec.inputs))
