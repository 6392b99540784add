from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ThinkRequest(_message.Message):
    __slots__ = ("start", "prompt", "prompt_end", "resume")
    START_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_END_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    start: ThinkStart
    prompt: _tensor_pb2.TensorPiece
    prompt_end: PromptEnd
    resume: ThinkResume
    def __init__(self, start: _Optional[_Union[ThinkStart, _Mapping]] = ..., prompt: _Optional[_Union[_tensor_pb2.TensorPiece, _Mapping]] = ..., prompt_end: _Optional[_Union[PromptEnd, _Mapping]] = ..., resume: _Optional[_Union[ThinkResume, _Mapping]] = ...) -> None: ...

class ThinkStart(_message.Message):
    __slots__ = ("request_id", "sampling", "max_new_tokens", "use_audio_in_video", "return_mm_hidden", "cache_key", "segments", "defer_media", "keep", "prefill_only", "mm_hidden_from")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USE_AUDIO_IN_VIDEO_FIELD_NUMBER: _ClassVar[int]
    RETURN_MM_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    DEFER_MEDIA_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    MM_HIDDEN_FROM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    use_audio_in_video: bool
    return_mm_hidden: bool
    cache_key: str
    segments: _containers.RepeatedCompositeFieldContainer[MediaSegment]
    defer_media: bool
    keep: _common_pb2.KeepKV
    prefill_only: bool
    mm_hidden_from: int
    def __init__(self, request_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., use_audio_in_video: _Optional[bool] = ..., return_mm_hidden: _Optional[bool] = ..., cache_key: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[MediaSegment, _Mapping]]] = ..., defer_media: _Optional[bool] = ..., keep: _Optional[_Union[_common_pb2.KeepKV, str]] = ..., prefill_only: _Optional[bool] = ..., mm_hidden_from: _Optional[int] = ...) -> None: ...

class MediaSegment(_message.Message):
    __slots__ = ("start", "end", "digest")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    digest: bytes
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class PromptEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ThinkResume(_message.Message):
    __slots__ = ("token_ids", "max_new_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class ThinkResponse(_message.Message):
    __slots__ = ("mm_hidden", "mm_hidden_from", "tokens", "end", "prefix")
    MM_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MM_HIDDEN_FROM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    mm_hidden: _tensor_pb2.TensorPiece
    mm_hidden_from: int
    tokens: _common_pb2.Tokens
    end: ThinkEnd
    prefix: Prefix
    def __init__(self, mm_hidden: _Optional[_Union[_tensor_pb2.TensorPiece, _Mapping]] = ..., mm_hidden_from: _Optional[int] = ..., tokens: _Optional[_Union[_common_pb2.Tokens, _Mapping]] = ..., end: _Optional[_Union[ThinkEnd, _Mapping]] = ..., prefix: _Optional[_Union[Prefix, _Mapping]] = ...) -> None: ...

class Prefix(_message.Message):
    __slots__ = ("reused_tokens",)
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reused_tokens: int
    def __init__(self, reused_tokens: _Optional[int] = ...) -> None: ...

class ThinkEnd(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "generated_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    prompt_tokens: int
    generated_tokens: int
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...
