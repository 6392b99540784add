from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[MTPFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[MTPFrame, _Mapping]]] = ...) -> None: ...

class MTPFrame(_message.Message):
    __slots__ = ("request_id", "frame", "hidden", "c0", "greedy", "seed", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    frame: int
    hidden: _tensor_pb2.Tensor
    c0: int
    greedy: bool
    seed: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., frame: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., c0: _Optional[int] = ..., greedy: _Optional[bool] = ..., seed: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[MTPAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[MTPAnswer, _Mapping]]] = ...) -> None: ...

class MTPAnswer(_message.Message):
    __slots__ = ("request_id", "frame", "codes", "embed_sum")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    EMBED_SUM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    frame: int
    codes: _common_pb2.CodecFrame
    embed_sum: _tensor_pb2.Tensor
    def __init__(self, request_id: _Optional[str] = ..., frame: _Optional[int] = ..., codes: _Optional[_Union[_common_pb2.CodecFrame, _Mapping]] = ..., embed_sum: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
