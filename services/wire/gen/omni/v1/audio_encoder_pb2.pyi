from services.wire.gen.omni.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeAudioRequest(_message.Message):
    __slots__ = ("start", "piece")
    START_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    start: EncodeAudioStart
    piece: _tensor_pb2.TensorPiece
    def __init__(self, start: _Optional[_Union[EncodeAudioStart, _Mapping]] = ..., piece: _Optional[_Union[_tensor_pb2.TensorPiece, _Mapping]] = ...) -> None: ...

class EncodeAudioStart(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class EncodeAudioResponse(_message.Message):
    __slots__ = ("piece",)
    PIECE_FIELD_NUMBER: _ClassVar[int]
    piece: _tensor_pb2.TensorPiece
    def __init__(self, piece: _Optional[_Union[_tensor_pb2.TensorPiece, _Mapping]] = ...) -> None: ...
