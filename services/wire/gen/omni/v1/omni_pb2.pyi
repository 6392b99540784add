from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_AUDIO: _ClassVar[Modality]
MODALITY_UNSPECIFIED: Modality
MODALITY_TEXT: Modality
MODALITY_AUDIO: Modality

class ConverseRequest(_message.Message):
    __slots__ = ("config", "text", "audio", "image", "video_frame", "end_of_turn", "cancel")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FRAME_FIELD_NUMBER: _ClassVar[int]
    END_OF_TURN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    config: ConverseConfig
    text: TextInput
    audio: AudioInput
    image: ImageInput
    video_frame: VideoFrame
    end_of_turn: EndOfTurn
    cancel: Cancel
    def __init__(self, config: _Optional[_Union[ConverseConfig, _Mapping]] = ..., text: _Optional[_Union[TextInput, _Mapping]] = ..., audio: _Optional[_Union[AudioInput, _Mapping]] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., video_frame: _Optional[_Union[VideoFrame, _Mapping]] = ..., end_of_turn: _Optional[_Union[EndOfTurn, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class ConverseConfig(_message.Message):
    __slots__ = ("session_id", "request_id", "speaker", "output_modalities", "system_prompt", "talker_style", "thinker_sampling", "talker_sampling", "max_new_tokens", "max_audio_frames", "metadata", "history", "defer_prefill")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TALKER_STYLE_FIELD_NUMBER: _ClassVar[int]
    THINKER_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TALKER_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DEFER_PREFILL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    speaker: str
    output_modalities: _containers.RepeatedScalarFieldContainer[Modality]
    system_prompt: str
    talker_style: str
    thinker_sampling: _common_pb2.SamplingParams
    talker_sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    max_audio_frames: int
    metadata: _containers.ScalarMap[str, str]
    history: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    defer_prefill: bool
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., speaker: _Optional[str] = ..., output_modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., system_prompt: _Optional[str] = ..., talker_style: _Optional[str] = ..., thinker_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., talker_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., max_audio_frames: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., history: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., defer_prefill: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "text")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    role: str
    text: str
    def __init__(self, role: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class TextInput(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class AudioInput(_message.Message):
    __slots__ = ("audio_id", "encoded", "pcm16", "sample_rate", "channels", "video_id")
    AUDIO_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PCM16_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    audio_id: str
    encoded: bytes
    pcm16: bytes
    sample_rate: int
    channels: int
    video_id: str
    def __init__(self, audio_id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., pcm16: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ..., video_id: _Optional[str] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("image_id", "data")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    data: bytes
    def __init__(self, image_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class VideoFrame(_message.Message):
    __slots__ = ("video_id", "timestamp_s", "image")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    timestamp_s: float
    image: bytes
    def __init__(self, video_id: _Optional[str] = ..., timestamp_s: _Optional[float] = ..., image: _Optional[bytes] = ...) -> None: ...

class EndOfTurn(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("started", "text", "audio", "hook_event", "summary", "reasoning")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    HOOK_EVENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    started: TurnStarted
    text: TextDelta
    audio: AudioChunk
    hook_event: _common_pb2.HookEvent
    summary: TurnSummary
    reasoning: ReasoningDelta
    def __init__(self, started: _Optional[_Union[TurnStarted, _Mapping]] = ..., text: _Optional[_Union[TextDelta, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., hook_event: _Optional[_Union[_common_pb2.HookEvent, _Mapping]] = ..., summary: _Optional[_Union[TurnSummary, _Mapping]] = ..., reasoning: _Optional[_Union[ReasoningDelta, _Mapping]] = ...) -> None: ...

class TurnStarted(_message.Message):
    __slots__ = ("request_id", "session_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReasoningDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("seq", "pcm16", "sample_rate")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PCM16_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pcm16: bytes
    sample_rate: int
    def __init__(self, seq: _Optional[int] = ..., pcm16: _Optional[bytes] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class TurnSummary(_message.Message):
    __slots__ = ("text", "thinker_token_ids", "codes", "sample_rate", "num_samples", "speaker", "finish_reason", "timings", "reasoning")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    THINKER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    text: str
    thinker_token_ids: _containers.RepeatedScalarFieldContainer[int]
    codes: _containers.RepeatedCompositeFieldContainer[_common_pb2.CodecFrame]
    sample_rate: int
    num_samples: int
    speaker: str
    finish_reason: _common_pb2.FinishReason
    timings: _containers.ScalarMap[str, float]
    reasoning: str
    def __init__(self, text: _Optional[str] = ..., thinker_token_ids: _Optional[_Iterable[int]] = ..., codes: _Optional[_Iterable[_Union[_common_pb2.CodecFrame, _Mapping]]] = ..., sample_rate: _Optional[int] = ..., num_samples: _Optional[int] = ..., speaker: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timings: _Optional[_Mapping[str, float]] = ..., reasoning: _Optional[str] = ...) -> None: ...

class DescribeDeploymentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeploymentInfo(_message.Message):
    __slots__ = ("variant", "model", "input_modalities", "output_modalities", "speakers", "reasoning", "input_rules")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    INPUT_RULES_FIELD_NUMBER: _ClassVar[int]
    variant: str
    model: str
    input_modalities: _containers.RepeatedScalarFieldContainer[str]
    output_modalities: _containers.RepeatedScalarFieldContainer[Modality]
    speakers: _containers.RepeatedScalarFieldContainer[str]
    reasoning: bool
    input_rules: str
    def __init__(self, variant: _Optional[str] = ..., model: _Optional[str] = ..., input_modalities: _Optional[_Iterable[str]] = ..., output_modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., speakers: _Optional[_Iterable[str]] = ..., reasoning: _Optional[bool] = ..., input_rules: _Optional[str] = ...) -> None: ...
