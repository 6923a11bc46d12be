"""The gateway's protobuf mirror (protos/anvil/tinker/v1) is wire-identical to the tinker SDK's schema."""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from protos.anvil.tinker.v1 import tinker_public_pb2 as ours


def _shape(file_descriptor) -> dict:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)

    def message(m, prefix: str) -> dict:
        fields = {
            f.number: (f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1], f.proto3_optional,
                       m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
            for f in m.field
        }  # fmt: skip
        nested = {n.name: message(n, f"{prefix}{n.name}.") for n in m.nested_type}
        return {"fields": fields, "nested": nested}

    enums = {e.name: [(v.name, v.number) for v in e.value] for e in proto.enum_type}
    return {"enums": enums, "messages": {m.name: message(m, "") for m in proto.message_type}}


def test_every_message_field_number_type_and_oneof_matches_the_sdk():
    from tinker.proto import tinker_public_pb2 as sdk

    assert _shape(ours.DESCRIPTOR) == _shape(sdk.DESCRIPTOR)


def test_a_request_encoded_by_the_sdk_decodes_with_ours():
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 0.5, -2.0]},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="s:train:0",
        seq_id=3,
    )
    decoded = ours.ForwardBackwardRequest.FromString(forward_backward_request_to_proto(request).SerializeToString())
    assert (decoded.model_id, decoded.seq_id, decoded.loss_fn) == ("s:train:0", 3, "cross_entropy")
    assert decoded.data[0].loss_fn_inputs["weights"].dtype == ours.DTYPE_FLOAT32
