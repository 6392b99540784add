"""The wire format: generated protobuf/gRPC code (gen/), the tensor codec and gRPC server helpers."""
