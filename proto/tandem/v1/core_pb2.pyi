from tandem.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Refusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCEPTED: _ClassVar[Refusal]
    QUEUE_FULL: _ClassVar[Refusal]
    NEVER_FITS: _ClassVar[Refusal]
    NO_WORKER: _ClassVar[Refusal]
    GRAMMAR_INVALID: _ClassVar[Refusal]
ACCEPTED: Refusal
QUEUE_FULL: Refusal
NEVER_FITS: Refusal
NO_WORKER: Refusal
GRAMMAR_INVALID: Refusal

class Submit(_message.Message):
    __slots__ = ("uid", "req_id", "client_id", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "num_logprobs", "stop_token_ids", "eos_token_ids", "ignore_eos", "arrival_time", "cache_salt", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens", "leader_uid", "constraint_kind", "constraint_spec")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    UID_FIELD_NUMBER: _ClassVar[int]
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEADER_UID_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_KIND_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_SPEC_FIELD_NUMBER: _ClassVar[int]
    uid: int
    req_id: str
    client_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    num_logprobs: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    arrival_time: float
    cache_salt: str
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    min_tokens: int
    leader_uid: int
    constraint_kind: str
    constraint_spec: str
    def __init__(self, uid: _Optional[int] = ..., req_id: _Optional[str] = ..., client_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., num_logprobs: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., arrival_time: _Optional[float] = ..., cache_salt: _Optional[str] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., min_tokens: _Optional[int] = ..., leader_uid: _Optional[int] = ..., constraint_kind: _Optional[str] = ..., constraint_spec: _Optional[str] = ...) -> None: ...

class Admitted(_message.Message):
    __slots__ = ("uid", "refusal", "message")
    UID_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    uid: int
    refusal: Refusal
    message: str
    def __init__(self, uid: _Optional[int] = ..., refusal: _Optional[_Union[Refusal, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("uids", "reason")
    UIDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    uids: _containers.RepeatedScalarFieldContainer[int]
    reason: int
    def __init__(self, uids: _Optional[_Iterable[int]] = ..., reason: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running", "waiting", "kv_usage", "busy_ratio", "preemptions", "prefix_cache_queries", "prefix_cache_hits", "prefix_cached_blocks", "prefix_evictable_blocks")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    BUSY_RATIO_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_usage: float
    busy_ratio: float
    preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cached_blocks: int
    prefix_evictable_blocks: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., busy_ratio: _Optional[float] = ..., preemptions: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cached_blocks: _Optional[int] = ..., prefix_evictable_blocks: _Optional[int] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("step_id", "arrays", "load", "decode", "compute_s")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    arrays: _containers.RepeatedCompositeFieldContainer[_engine_pb2.ArraySpec]
    load: Load
    decode: bool
    compute_s: float
    def __init__(self, step_id: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[_engine_pb2.ArraySpec, _Mapping]]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., decode: _Optional[bool] = ..., compute_s: _Optional[float] = ...) -> None: ...

class Serving(_message.Message):
    __slots__ = ("hello", "pipeline_depth", "resumed")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    hello: bytes
    pipeline_depth: int
    resumed: int
    def __init__(self, hello: _Optional[bytes] = ..., pipeline_depth: _Optional[int] = ..., resumed: _Optional[int] = ...) -> None: ...

class Lost(_message.Message):
    __slots__ = ("code", "reason", "preemptions", "last", "resumable", "uids")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    UIDS_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    preemptions: int
    last: Stats
    resumable: bool
    uids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., preemptions: _Optional[int] = ..., last: _Optional[_Union[Stats, _Mapping]] = ..., resumable: _Optional[bool] = ..., uids: _Optional[_Iterable[int]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("nonce", "connected", "running", "waiting", "kv_usage", "preemptions", "kv_blocks_total", "kv_blocks_free", "steps", "busy_ratio", "compute_ms", "idle_gap_ms", "prefix_cache_queries", "prefix_cache_hits", "prefix_cached_blocks", "prefix_evictable_blocks")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BUSY_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_GAP_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    connected: bool
    running: int
    waiting: int
    kv_usage: float
    preemptions: int
    kv_blocks_total: int
    kv_blocks_free: int
    steps: int
    busy_ratio: float
    compute_ms: float
    idle_gap_ms: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cached_blocks: int
    prefix_evictable_blocks: int
    def __init__(self, nonce: _Optional[int] = ..., connected: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., preemptions: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., steps: _Optional[int] = ..., busy_ratio: _Optional[float] = ..., compute_ms: _Optional[float] = ..., idle_gap_ms: _Optional[float] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cached_blocks: _Optional[int] = ..., prefix_evictable_blocks: _Optional[int] = ...) -> None: ...
