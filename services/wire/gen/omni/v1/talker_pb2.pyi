from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpeakRequest(_message.Message):
    __slots__ = ("start", "prompt", "text", "text_end")
    START_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_END_FIELD_NUMBER: _ClassVar[int]
    start: SpeakStart
    prompt: _tensor_pb2.TensorPiece
    text: _common_pb2.Tokens
    text_end: TextEnd
    def __init__(self, start: _Optional[_Union[SpeakStart, _Mapping]] = ..., prompt: _Optional[_Union[_tensor_pb2.TensorPiece, _Mapping]] = ..., text: _Optional[_Union[_common_pb2.Tokens, _Mapping]] = ..., text_end: _Optional[_Union[TextEnd, _Mapping]] = ...) -> None: ...

class SpeakStart(_message.Message):
    __slots__ = ("request_id", "speaker", "sampling", "max_frames", "use_audio_in_video", "cache_key", "keep", "prefill_only", "mm_from", "rows_tag")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    USE_AUDIO_IN_VIDEO_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    MM_FROM_FIELD_NUMBER: _ClassVar[int]
    ROWS_TAG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    speaker: str
    sampling: _common_pb2.SamplingParams
    max_frames: int
    use_audio_in_video: bool
    cache_key: str
    keep: _common_pb2.KeepKV
    prefill_only: bool
    mm_from: int
    rows_tag: str
    def __init__(self, request_id: _Optional[str] = ..., speaker: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_frames: _Optional[int] = ..., use_audio_in_video: _Optional[bool] = ..., cache_key: _Optional[str] = ..., keep: _Optional[_Union[_common_pb2.KeepKV, str]] = ..., prefill_only: _Optional[bool] = ..., mm_from: _Optional[int] = ..., rows_tag: _Optional[str] = ...) -> None: ...

class TextEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpeakResponse(_message.Message):
    __slots__ = ("frame", "end")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    frame: _common_pb2.CodecFrame
    end: SpeakEnd
    def __init__(self, frame: _Optional[_Union[_common_pb2.CodecFrame, _Mapping]] = ..., end: _Optional[_Union[SpeakEnd, _Mapping]] = ...) -> None: ...

class SpeakEnd(_message.Message):
    __slots__ = ("code", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...
