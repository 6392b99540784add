from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import omni_pb2 as _omni_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextFilterRequest(_message.Message):
    __slots__ = ("start", "text", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: TextFilterStart
    text: TextPiece
    end: TextPiece
    def __init__(self, start: _Optional[_Union[TextFilterStart, _Mapping]] = ..., text: _Optional[_Union[TextPiece, _Mapping]] = ..., end: _Optional[_Union[TextPiece, _Mapping]] = ...) -> None: ...

class TextFilterStart(_message.Message):
    __slots__ = ("request_id", "session_id", "conversation", "metadata", "params", "principal")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    conversation: _containers.RepeatedCompositeFieldContainer[_omni_pb2.ChatMessage]
    metadata: _containers.ScalarMap[str, str]
    params: str
    principal: str
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., conversation: _Optional[_Iterable[_Union[_omni_pb2.ChatMessage, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., params: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class TextPiece(_message.Message):
    __slots__ = ("text", "ahead", "reasoning")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    text: str
    ahead: str
    reasoning: bool
    def __init__(self, text: _Optional[str] = ..., ahead: _Optional[str] = ..., reasoning: _Optional[bool] = ...) -> None: ...

class TextVerdict(_message.Message):
    __slots__ = ("release", "hold", "block", "events")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    release: TextRelease
    hold: TextHold
    block: TextBlock
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.HookEvent]
    def __init__(self, release: _Optional[_Union[TextRelease, _Mapping]] = ..., hold: _Optional[_Union[TextHold, _Mapping]] = ..., block: _Optional[_Union[TextBlock, _Mapping]] = ..., events: _Optional[_Iterable[_Union[_common_pb2.HookEvent, _Mapping]]] = ...) -> None: ...

class TextRelease(_message.Message):
    __slots__ = ("text", "keep")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    text: str
    keep: str
    def __init__(self, text: _Optional[str] = ..., keep: _Optional[str] = ...) -> None: ...

class TextHold(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TextBlock(_message.Message):
    __slots__ = ("reason", "fallback")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    reason: str
    fallback: str
    def __init__(self, reason: _Optional[str] = ..., fallback: _Optional[str] = ...) -> None: ...

class ToolRequest(_message.Message):
    __slots__ = ("name", "arguments", "request_id", "session_id", "metadata", "principal")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    arguments: str
    request_id: str
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    principal: str
    def __init__(self, name: _Optional[str] = ..., arguments: _Optional[str] = ..., request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., principal: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("content",)
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    content: str
    def __init__(self, content: _Optional[str] = ...) -> None: ...
