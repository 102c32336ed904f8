from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("message", "server_time_unix_ms", "pid", "worker_mode", "adapter", "shm_dir")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_MODE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    message: str
    server_time_unix_ms: int
    pid: int
    worker_mode: str
    adapter: str
    shm_dir: str
    def __init__(self, message: _Optional[str] = ..., server_time_unix_ms: _Optional[int] = ..., pid: _Optional[int] = ..., worker_mode: _Optional[str] = ..., adapter: _Optional[str] = ..., shm_dir: _Optional[str] = ...) -> None: ...

class ParameterSpec(_message.Message):
    __slots__ = ("name", "type", "required", "default_json", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default_json: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default_json: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ToolSpec(_message.Message):
    __slots__ = ("name", "description", "parameters", "supports_streaming")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_STREAMING_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterSpec]
    supports_streaming: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterSpec, _Mapping]]] = ..., supports_streaming: _Optional[bool] = ...) -> None: ...

class DescribeToolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeToolsResponse(_message.Message):
    __slots__ = ("tools", "adapter")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[ToolSpec]
    adapter: str
    def __init__(self, tools: _Optional[_Iterable[_Union[ToolSpec, _Mapping]]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ExecuteToolRequest(_message.Message):
    __slots__ = ("tool_name", "args_json", "blobs", "session_id", "request_id", "metadata", "seed", "shm_result_prefix", "shm_result_min_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHM_RESULT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SHM_RESULT_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    args_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    session_id: str
    request_id: str
    metadata: _containers.ScalarMap[str, str]
    seed: int
    shm_result_prefix: str
    shm_result_min_bytes: int
    def __init__(self, tool_name: _Optional[str] = ..., args_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., seed: _Optional[int] = ..., shm_result_prefix: _Optional[str] = ..., shm_result_min_bytes: _Optional[int] = ...) -> None: ...

class ExecuteToolResponse(_message.Message):
    __slots__ = ("result_json", "blobs", "request_id", "duration_ms")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    request_id: str
    duration_ms: float
    def __init__(self, result_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., request_id: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class ToolChunk(_message.Message):
    __slots__ = ("sequence", "data_json", "blobs", "is_final")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    data_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    is_final: bool
    def __init__(self, sequence: _Optional[int] = ..., data_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., is_final: _Optional[bool] = ...) -> None: ...

class ToolError(_message.Message):
    __slots__ = ("code", "type", "message", "traceback", "tool_name")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    code: int
    type: str
    message: str
    traceback: str
    tool_name: str
    def __init__(self, code: _Optional[int] = ..., type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., tool_name: _Optional[str] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("args_json", "blobs")
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    args_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, args_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ExecuteBatchRequest(_message.Message):
    __slots__ = ("tool_name", "items", "session_id", "request_id", "metadata", "max_parallelism", "shm_result_prefix", "shm_result_min_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    SHM_RESULT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SHM_RESULT_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    session_id: str
    request_id: str
    metadata: _containers.ScalarMap[str, str]
    max_parallelism: int
    shm_result_prefix: str
    shm_result_min_bytes: int
    def __init__(self, tool_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., max_parallelism: _Optional[int] = ..., shm_result_prefix: _Optional[str] = ..., shm_result_min_bytes: _Optional[int] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("ok", "result_json", "blobs", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    result_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    error: ToolError
    def __init__(self, ok: _Optional[bool] = ..., result_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., error: _Optional[_Union[ToolError, _Mapping]] = ...) -> None: ...

class ExecuteBatchResponse(_message.Message):
    __slots__ = ("results", "request_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    request_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InitializeSessionRequest(_message.Message):
    __slots__ = ("session_id", "state_json", "blobs", "ttl_seconds", "seed", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_seconds: int
    seed: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., state_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., ttl_seconds: _Optional[int] = ..., seed: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InitializeSessionResponse(_message.Message):
    __slots__ = ("session_id", "created", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    created: bool
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., created: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session_id", "state_json", "blobs", "created_at_unix_ms", "last_used_unix_ms", "request_count", "ttl_seconds", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state_json: str
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    created_at_unix_ms: int
    last_used_unix_ms: int
    request_count: int
    ttl_seconds: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., state_json: _Optional[str] = ..., blobs: _Optional[_Iterable[bytes]] = ..., created_at_unix_ms: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ..., request_count: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CleanupSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CleanupSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time_unix_ms", "serving", "session_alive")
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    SESSION_ALIVE_FIELD_NUMBER: _ClassVar[int]
    server_time_unix_ms: int
    serving: bool
    session_alive: bool
    def __init__(self, server_time_unix_ms: _Optional[int] = ..., serving: _Optional[bool] = ..., session_alive: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ToolStats(_message.Message):
    __slots__ = ("name", "calls", "failures", "mean_ms", "p50_ms", "p99_ms", "max_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    calls: int
    failures: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    def __init__(self, name: _Optional[str] = ..., calls: _Optional[int] = ..., failures: _Optional[int] = ..., mean_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("requests_total", "requests_active", "requests_failed", "threads", "max_workers", "uptime_seconds", "worker_mode", "gil_enabled", "python_version", "pid", "tools", "sessions_active", "requests_queued", "adapter_stats_json", "thread_safety_json")
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_MODE_FIELD_NUMBER: _ClassVar[int]
    GIL_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    THREAD_SAFETY_JSON_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    requests_active: int
    requests_failed: int
    threads: int
    max_workers: int
    uptime_seconds: float
    worker_mode: str
    gil_enabled: bool
    python_version: str
    pid: int
    tools: _containers.RepeatedCompositeFieldContainer[ToolStats]
    sessions_active: int
    requests_queued: int
    adapter_stats_json: str
    thread_safety_json: str
    def __init__(self, requests_total: _Optional[int] = ..., requests_active: _Optional[int] = ..., requests_failed: _Optional[int] = ..., threads: _Optional[int] = ..., max_workers: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., worker_mode: _Optional[str] = ..., gil_enabled: _Optional[bool] = ..., python_version: _Optional[str] = ..., pid: _Optional[int] = ..., tools: _Optional[_Iterable[_Union[ToolStats, _Mapping]]] = ..., sessions_active: _Optional[int] = ..., requests_queued: _Optional[int] = ..., adapter_stats_json: _Optional[str] = ..., thread_safety_json: _Optional[str] = ...) -> None: ...
