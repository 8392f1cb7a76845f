import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from flywheel.v1 import serving_pb2 as _serving_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_EVENT_KIND_UNSPECIFIED: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_CANDIDATE: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_APPROVED: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_REJECTED: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_LIVE: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_ROLLBACK: _ClassVar[PolicyEventKind]
    POLICY_EVENT_KIND_CANARY: _ClassVar[PolicyEventKind]
POLICY_EVENT_KIND_UNSPECIFIED: PolicyEventKind
POLICY_EVENT_KIND_CANDIDATE: PolicyEventKind
POLICY_EVENT_KIND_APPROVED: PolicyEventKind
POLICY_EVENT_KIND_REJECTED: PolicyEventKind
POLICY_EVENT_KIND_LIVE: PolicyEventKind
POLICY_EVENT_KIND_ROLLBACK: PolicyEventKind
POLICY_EVENT_KIND_CANARY: PolicyEventKind

class GenerationLogged(_message.Message):
    __slots__ = ("event_id", "response_id", "prompt", "chat", "rendered_prompt", "response_text", "prompt_token_ids", "response_token_ids", "behavior_logprobs", "sampling", "finish_reason", "policy_version", "user_id", "client_request_id", "tags", "requested_at", "finished_at", "server_id", "principal")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RENDERED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    response_id: str
    prompt: str
    chat: _serving_pb2.ChatMessages
    rendered_prompt: str
    response_text: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    behavior_logprobs: _containers.RepeatedScalarFieldContainer[float]
    sampling: _serving_pb2.SamplingParams
    finish_reason: _serving_pb2.FinishReason
    policy_version: int
    user_id: str
    client_request_id: str
    tags: _containers.ScalarMap[str, str]
    requested_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    server_id: str
    principal: str
    def __init__(self, event_id: _Optional[str] = ..., response_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_serving_pb2.ChatMessages, _Mapping]] = ..., rendered_prompt: _Optional[str] = ..., response_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., behavior_logprobs: _Optional[_Iterable[float]] = ..., sampling: _Optional[_Union[_serving_pb2.SamplingParams, _Mapping]] = ..., finish_reason: _Optional[_Union[_serving_pb2.FinishReason, str]] = ..., policy_version: _Optional[int] = ..., user_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., server_id: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class FeedbackGiven(_message.Message):
    __slots__ = ("event_id", "response_id", "user_id", "rating", "comment", "preferred_over_response_id", "policy_version", "given_at", "principal")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_OVER_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GIVEN_AT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    response_id: str
    user_id: str
    rating: _serving_pb2.Rating
    comment: str
    preferred_over_response_id: str
    policy_version: int
    given_at: _timestamp_pb2.Timestamp
    principal: str
    def __init__(self, event_id: _Optional[str] = ..., response_id: _Optional[str] = ..., user_id: _Optional[str] = ..., rating: _Optional[_Union[_serving_pb2.Rating, str]] = ..., comment: _Optional[str] = ..., preferred_over_response_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., given_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ...) -> None: ...

class GateCheck(_message.Message):
    __slots__ = ("name", "value", "threshold", "passed", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    threshold: float
    passed: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., passed: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PolicyEvent(_message.Message):
    __slots__ = ("event_id", "kind", "policy_version", "parent_version", "path", "digest", "reasons", "checks", "server_id", "at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: PolicyEventKind
    policy_version: int
    parent_version: int
    path: str
    digest: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    checks: _containers.RepeatedCompositeFieldContainer[GateCheck]
    server_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[_Union[PolicyEventKind, str]] = ..., policy_version: _Optional[int] = ..., parent_version: _Optional[int] = ..., path: _Optional[str] = ..., digest: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., checks: _Optional[_Iterable[_Union[GateCheck, _Mapping]]] = ..., server_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("source_topic", "partition", "offset", "key", "value", "reason", "at")
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    source_topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
