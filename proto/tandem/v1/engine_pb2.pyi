from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArraySpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "worker_id", "pid", "model_name", "vocab_size", "eos_token_ids", "max_context", "dtype", "device", "num_blocks", "block_size", "max_num_tokens", "max_num_rows", "max_blocks_per_row", "tokenizer_json", "chat_template", "bos_token", "eos_token", "add_bos_token", "default_temperature", "default_top_p", "default_top_k", "default_min_p", "instance_token", "replace", "tensor_parallel_size", "grammar_engine")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_P_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MIN_P_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_ENGINE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    worker_id: str
    pid: int
    model_name: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_context: int
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    max_num_tokens: int
    max_num_rows: int
    max_blocks_per_row: int
    tokenizer_json: bytes
    chat_template: str
    bos_token: str
    eos_token: str
    add_bos_token: bool
    default_temperature: float
    default_top_p: float
    default_top_k: int
    default_min_p: float
    instance_token: str
    replace: bool
    tensor_parallel_size: int
    grammar_engine: str
    def __init__(self, protocol_version: _Optional[int] = ..., worker_id: _Optional[str] = ..., pid: _Optional[int] = ..., model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_num_tokens: _Optional[int] = ..., max_num_rows: _Optional[int] = ..., max_blocks_per_row: _Optional[int] = ..., tokenizer_json: _Optional[bytes] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., add_bos_token: _Optional[bool] = ..., default_temperature: _Optional[float] = ..., default_top_p: _Optional[float] = ..., default_top_k: _Optional[int] = ..., default_min_p: _Optional[float] = ..., instance_token: _Optional[str] = ..., replace: _Optional[bool] = ..., tensor_parallel_size: _Optional[int] = ..., grammar_engine: _Optional[str] = ...) -> None: ...

class Compile(_message.Message):
    __slots__ = ("grammars",)
    GRAMMARS_FIELD_NUMBER: _ClassVar[int]
    grammars: _containers.RepeatedCompositeFieldContainer[GrammarSpec]
    def __init__(self, grammars: _Optional[_Iterable[_Union[GrammarSpec, _Mapping]]] = ...) -> None: ...

class GrammarSpec(_message.Message):
    __slots__ = ("key", "kind", "spec")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    key: str
    kind: str
    spec: str
    def __init__(self, key: _Optional[str] = ..., kind: _Optional[str] = ..., spec: _Optional[str] = ...) -> None: ...

class Compiled(_message.Message):
    __slots__ = ("key", "ok", "message", "compile_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    ok: bool
    message: str
    compile_ms: float
    def __init__(self, key: _Optional[str] = ..., ok: _Optional[bool] = ..., message: _Optional[str] = ..., compile_ms: _Optional[float] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class StepPlanHeader(_message.Message):
    __slots__ = ("step_id", "carry_from_step", "flush", "arrays", "request_ids", "check_state", "grammar_keys")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CARRY_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    CHECK_STATE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_KEYS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    carry_from_step: int
    flush: bool
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    request_ids: str
    check_state: bool
    grammar_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step_id: _Optional[int] = ..., carry_from_step: _Optional[int] = ..., flush: _Optional[bool] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., request_ids: _Optional[str] = ..., check_state: _Optional[bool] = ..., grammar_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Flush(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Refused(_message.Message):
    __slots__ = ("step_id", "reason")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    reason: str
    def __init__(self, step_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Bye(_message.Message):
    __slots__ = ("replaced", "reason")
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    replaced: bool
    reason: str
    def __init__(self, replaced: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("reason", "final")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    reason: str
    final: bool
    def __init__(self, reason: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class StepResultHeader(_message.Message):
    __slots__ = ("step_id", "compute_ms", "idle_gap_ms", "arrays", "state_digest", "grammar_ms")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_GAP_MS_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_MS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    compute_ms: float
    idle_gap_ms: float
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    state_digest: int
    grammar_ms: float
    def __init__(self, step_id: _Optional[int] = ..., compute_ms: _Optional[float] = ..., idle_gap_ms: _Optional[float] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., state_digest: _Optional[int] = ..., grammar_ms: _Optional[float] = ...) -> None: ...
