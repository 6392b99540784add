from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("start", "frames")
    START_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    start: DecodeStart
    frames: DecodeFrames
    def __init__(self, start: _Optional[_Union[DecodeStart, _Mapping]] = ..., frames: _Optional[_Union[DecodeFrames, _Mapping]] = ...) -> None: ...

class DecodeStart(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DecodeFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[_common_pb2.CodecFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[_common_pb2.CodecFrame, _Mapping]]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("seq", "samples", "sample_rate", "frames")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    samples: _tensor_pb2.Tensor
    sample_rate: int
    frames: int
    def __init__(self, seq: _Optional[int] = ..., samples: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sample_rate: _Optional[int] = ..., frames: _Optional[int] = ...) -> None: ...
