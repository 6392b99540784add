from services.wire.gen.omni.v1 import common_pb2 as _common_pb2
from services.wire.gen.omni.v1 import thinker_pb2 as _thinker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterRequest(_message.Message):
    __slots__ = ("start", "tokens", "thinker_end")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    THINKER_END_FIELD_NUMBER: _ClassVar[int]
    start: FilterStart
    tokens: _common_pb2.Tokens
    thinker_end: _thinker_pb2.ThinkEnd
    def __init__(self, start: _Optional[_Union[FilterStart, _Mapping]] = ..., tokens: _Optional[_Union[_common_pb2.Tokens, _Mapping]] = ..., thinker_end: _Optional[_Union[_thinker_pb2.ThinkEnd, _Mapping]] = ...) -> None: ...

class FilterStart(_message.Message):
    __slots__ = ("request_id", "session_id", "hooks", "metadata", "conversation_json", "principal")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_JSON_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    hooks: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    conversation_json: str
    principal: str
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., hooks: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., conversation_json: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class FilterResponse(_message.Message):
    __slots__ = ("released", "event", "resume", "end")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    released: Released
    event: _common_pb2.HookEvent
    resume: _thinker_pb2.ThinkResume
    end: FilterEnd
    def __init__(self, released: _Optional[_Union[Released, _Mapping]] = ..., event: _Optional[_Union[_common_pb2.HookEvent, _Mapping]] = ..., resume: _Optional[_Union[_thinker_pb2.ThinkResume, _Mapping]] = ..., end: _Optional[_Union[FilterEnd, _Mapping]] = ...) -> None: ...

class Released(_message.Message):
    __slots__ = ("token_ids", "text", "blocked", "reasoning", "reasoning_token_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    blocked: bool
    reasoning: str
    reasoning_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., blocked: _Optional[bool] = ..., reasoning: _Optional[str] = ..., reasoning_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FilterEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HooksInfo(_message.Message):
    __slots__ = ("filters", "tools_json", "max_tool_steps")
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_TOOL_STEPS_FIELD_NUMBER: _ClassVar[int]
    filters: _containers.RepeatedScalarFieldContainer[str]
    tools_json: str
    max_tool_steps: int
    def __init__(self, filters: _Optional[_Iterable[str]] = ..., tools_json: _Optional[str] = ..., max_tool_steps: _Optional[int] = ...) -> None: ...
