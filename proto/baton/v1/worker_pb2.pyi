from proto.baton.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "tenant", "cache_salt", "arrival_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    priority: int
    tenant: str
    cache_salt: str
    arrival_time: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., tenant: _Optional[str] = ..., cache_salt: _Optional[str] = ..., arrival_time: _Optional[float] = ...) -> None: ...

class KVTransferTarget(_message.Message):
    __slots__ = ("transfer_id", "endpoint", "block_ids", "num_cached_tokens", "deadline")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    endpoint: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    deadline: float
    def __init__(self, transfer_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., deadline: _Optional[float] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request", "lease_seconds", "fresh_blocks")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRESH_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    lease_seconds: float
    fresh_blocks: bool
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., lease_seconds: _Optional[float] = ..., fresh_blocks: _Optional[bool] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: KVTransferTarget
    def __init__(self, target: _Optional[_Union[KVTransferTarget, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "target", "target_follows")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    target: KVTransferTarget
    target_follows: bool
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., target: _Optional[_Union[KVTransferTarget, _Mapping]] = ..., target_follows: _Optional[bool] = ...) -> None: ...

class PrefillTarget(_message.Message):
    __slots__ = ("request_id", "target")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    target: KVTransferTarget
    def __init__(self, request_id: _Optional[str] = ..., target: _Optional[_Union[KVTransferTarget, _Mapping]] = ...) -> None: ...

class PrefillTargetAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first", "kv_bytes", "kv_seconds")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_SECONDS_FIELD_NUMBER: _ClassVar[int]
    first: _common_pb2.TokenChunk
    kv_bytes: int
    kv_seconds: float
    def __init__(self, first: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., kv_seconds: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "first_token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ...) -> None: ...
