from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("src", "messages", "leaders", "leaders_complete")
    SRC_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LEADERS_FIELD_NUMBER: _ClassVar[int]
    LEADERS_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    src: int
    messages: _containers.RepeatedCompositeFieldContainer[RaftMessage]
    leaders: _containers.RepeatedCompositeFieldContainer[LeaderEntry]
    leaders_complete: bool
    def __init__(self, src: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[RaftMessage, _Mapping]]] = ..., leaders: _Optional[_Iterable[_Union[LeaderEntry, _Mapping]]] = ..., leaders_complete: _Optional[bool] = ...) -> None: ...

class LeaderEntry(_message.Message):
    __slots__ = ("group_id", "epoch")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    epoch: int
    def __init__(self, group_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class RaftMessage(_message.Message):
    __slots__ = ("vote_request", "vote_response", "begin_quorum_epoch", "end_quorum_epoch", "fetch_request", "fetch_response")
    VOTE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    VOTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_QUORUM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    END_QUORUM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FETCH_REQUEST_FIELD_NUMBER: _ClassVar[int]
    FETCH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    vote_request: VoteRequest
    vote_response: VoteResponse
    begin_quorum_epoch: BeginQuorumEpoch
    end_quorum_epoch: EndQuorumEpoch
    fetch_request: FetchRequest
    fetch_response: FetchResponse
    def __init__(self, vote_request: _Optional[_Union[VoteRequest, _Mapping]] = ..., vote_response: _Optional[_Union[VoteResponse, _Mapping]] = ..., begin_quorum_epoch: _Optional[_Union[BeginQuorumEpoch, _Mapping]] = ..., end_quorum_epoch: _Optional[_Union[EndQuorumEpoch, _Mapping]] = ..., fetch_request: _Optional[_Union[FetchRequest, _Mapping]] = ..., fetch_response: _Optional[_Union[FetchResponse, _Mapping]] = ...) -> None: ...

class VoteRequest(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch", "last_epoch", "end_offset", "pre_vote")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    last_epoch: int
    end_offset: int
    pre_vote: bool
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., last_epoch: _Optional[int] = ..., end_offset: _Optional[int] = ..., pre_vote: _Optional[bool] = ...) -> None: ...

class VoteResponse(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch", "granted", "pre_vote", "leader_id")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    granted: bool
    pre_vote: bool
    leader_id: int
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., granted: _Optional[bool] = ..., pre_vote: _Optional[bool] = ..., leader_id: _Optional[int] = ...) -> None: ...

class BeginQuorumEpoch(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class EndQuorumEpoch(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch", "preferred_successors")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_SUCCESSORS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    preferred_successors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., preferred_successors: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch", "fetch_offset", "last_fetched_epoch", "fetch_id", "high_watermark", "max_wait_ms")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FETCH_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FETCHED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FETCH_ID_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    fetch_offset: int
    last_fetched_epoch: int
    fetch_id: int
    high_watermark: int
    max_wait_ms: int
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., fetch_offset: _Optional[int] = ..., last_fetched_epoch: _Optional[int] = ..., fetch_id: _Optional[int] = ..., high_watermark: _Optional[int] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("group_id", "src", "dst", "epoch", "leader_id", "error", "fetch_id", "fetch_offset", "last_fetched_epoch", "records", "high_watermark", "diverging_epoch", "diverging_end_offset")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FETCH_ID_FIELD_NUMBER: _ClassVar[int]
    FETCH_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FETCHED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    DIVERGING_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIVERGING_END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    src: int
    dst: int
    epoch: int
    leader_id: int
    error: int
    fetch_id: int
    fetch_offset: int
    last_fetched_epoch: int
    records: bytes
    high_watermark: int
    diverging_epoch: int
    diverging_end_offset: int
    def __init__(self, group_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., epoch: _Optional[int] = ..., leader_id: _Optional[int] = ..., error: _Optional[int] = ..., fetch_id: _Optional[int] = ..., fetch_offset: _Optional[int] = ..., last_fetched_epoch: _Optional[int] = ..., records: _Optional[bytes] = ..., high_watermark: _Optional[int] = ..., diverging_epoch: _Optional[int] = ..., diverging_end_offset: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "host", "port", "rack", "incarnation_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    host: str
    port: int
    rack: str
    incarnation_id: str
    def __init__(self, node_id: _Optional[int] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., rack: _Optional[str] = ..., incarnation_id: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("ok", "controller_id", "error_message")
    OK_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    controller_id: int
    error_message: str
    def __init__(self, ok: _Optional[bool] = ..., controller_id: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...
