"""The engine link's wire format: typed step messages <-> ZeroMQ multipart frames.

Owns the encoding both processes speak (schema in engine.proto): frame 0 is an ASCII kind tag,
frame 1 a protobuf header, then one raw frame per numpy array, in the order the header lists them.
Arrays travel as raw little-endian bytes (zero-copy on send); nothing here is pickled. numpy only:
the scheduler side must never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from tandem.v1 import engine_pb2 as pb

PROTOCOL_VERSION = 1

KIND_HELLO = b"HELLO"
KIND_PLAN = b"PLAN"
KIND_FLUSH = b"FLUSH"
KIND_RESULT = b"RESULT"
KINDS = (KIND_HELLO, KIND_PLAN, KIND_FLUSH, KIND_RESULT)

# Debug mode (`--debug-placeholders`): a carry-over placeholder is this sentinel instead of 0, so a
# placeholder that reaches the embedding unresolved cannot pass for a real token.
PLACEHOLDER_SENTINEL = -7

_ALLOWED_DTYPES = {"int8", "int32", "int64", "uint64", "float32"}
MAX_ARRAY_BYTES = 1 << 30


class WireError(ValueError):
    """A message that does not follow the protocol (garbage, truncated, wrong sizes)."""


def _pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[list[pb.ArraySpec], list[memoryview]]:
    specs, frames = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _ALLOWED_DTYPES:
            raise WireError(f"array {name!r}: dtype {arr.dtype.name} not allowed on the wire")
        specs.append(pb.ArraySpec(name=name, dtype=arr.dtype.name, shape=list(arr.shape)))
        frames.append(memoryview(arr).cast("B"))
    return specs, frames


def _unpack_arrays(specs, frames: list) -> dict[str, np.ndarray]:
    if len(specs) != len(frames):
        raise WireError(f"header lists {len(specs)} arrays, message carries {len(frames)}")
    out: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames, strict=True):
        if spec.dtype not in _ALLOWED_DTYPES:
            raise WireError(f"array {spec.name!r}: dtype {spec.dtype!r} not allowed")
        if any(d < 0 for d in spec.shape):
            raise WireError(f"array {spec.name!r}: negative dimension")
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        count = int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1
        buf = memoryview(frame)
        if count * dtype.itemsize != buf.nbytes or buf.nbytes > MAX_ARRAY_BYTES:
            raise WireError(
                f"array {spec.name!r}: {buf.nbytes} bytes for shape {list(spec.shape)} {spec.dtype}"
            )
        out[spec.name] = np.frombuffer(buf, dtype=dtype).reshape(tuple(spec.shape))
    return out


@dataclass
class Hello:
    """Worker -> scheduler handshake: model facts, KV capacity and step limits."""

    worker_id: str
    pid: int
    model_name: str
    vocab_size: int
    eos_token_ids: list[int]
    max_context: int
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    max_num_tokens: int
    max_num_rows: int
    max_blocks_per_row: int
    tokenizer_json: bytes
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = False
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_min_p: float = 0.0
    protocol_version: int = PROTOCOL_VERSION

    def encode(self) -> list[bytes]:
        msg = pb.Hello(**{f.name: getattr(self, f.name) for f in fields(self)})
        return [KIND_HELLO, msg.SerializeToString()]

    @classmethod
    def from_header(cls, header: bytes) -> Hello:
        msg = pb.Hello.FromString(header)
        kw = {f.name: getattr(msg, f.name) for f in fields(cls)}
        kw["eos_token_ids"] = list(msg.eos_token_ids)
        return cls(**kw)


# Per-row and per-token arrays of a StepPlan, with their dtypes; the order is the frame order.
PLAN_ARRAYS: dict[str, str] = {
    "input_ids": "int32",
    "positions": "int32",
    "slot_mapping": "int32",
    "query_start": "int32",
    "kv_lens": "int32",
    "block_tables": "int32",
    "carry_index": "int32",
    "sample": "int32",
    "temperature": "float32",
    "top_p": "float32",
    "top_k": "int32",
    "min_p": "float32",
    "seed": "uint64",
    "num_logprobs": "int32",
}


@dataclass
class StepPlan:
    """One step's batch metadata, shaped like the worker's I/O slot buffers (see engine.proto)."""

    step_id: int
    carry_from_step: int
    flush: bool
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start: np.ndarray
    kv_lens: np.ndarray
    block_tables: np.ndarray
    carry_index: np.ndarray
    sample: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    min_p: np.ndarray
    seed: np.ndarray
    num_logprobs: np.ndarray
    request_ids: str = ""  # row -> client request id, "\n"-joined (logs only; may be empty)

    def row_request_ids(self) -> list[str]:
        ids = self.request_ids.split("\n") if self.request_ids else []
        return ids if len(ids) == self.num_rows else [""] * self.num_rows

    @property
    def num_rows(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, max_tokens: int, max_rows: int, max_blocks_per_row: int, vocab_size: int) -> None:
        """Shape and range checks a worker runs before touching its buffers."""
        r, t = self.num_rows, self.num_tokens
        if not (0 < r <= max_rows and 0 < t <= max_tokens):
            raise WireError(f"step {self.step_id}: {r} rows / {t} tokens outside limits")
        for name in PLAN_ARRAYS:
            arr = getattr(self, name)
            if arr.dtype.name != PLAN_ARRAYS[name]:
                raise WireError(f"{name}: dtype {arr.dtype.name}, expected {PLAN_ARRAYS[name]}")
        per_token = ("input_ids", "positions", "slot_mapping")
        per_row = ("kv_lens", "carry_index", "sample", "temperature", "top_p", "top_k", "min_p",
                   "seed", "num_logprobs")
        for name in per_token:
            if getattr(self, name).shape != (t,):
                raise WireError(f"{name}: shape {getattr(self, name).shape}, expected ({t},)")
        for name in per_row:
            if getattr(self, name).shape != (r,):
                raise WireError(f"{name}: shape {getattr(self, name).shape}, expected ({r},)")
        if self.query_start.shape != (r + 1,):
            raise WireError("query_start: wrong shape")
        bt = self.block_tables
        if bt.ndim != 2 or bt.shape[0] != r or bt.shape[1] > max_blocks_per_row:
            raise WireError(f"block_tables: shape {bt.shape}")
        qs = self.query_start
        if qs[0] != 0 or qs[-1] != t or np.any(np.diff(qs) <= 0):
            raise WireError("query_start: not a strictly increasing 0..T range")
        ids = self.input_ids
        placeholder = ids == PLACEHOLDER_SENTINEL
        if np.any(placeholder):
            # A sentinel may only sit at the first token of a row that carries over.
            carried = np.zeros(t, dtype=bool)
            carried[qs[:-1][self.carry_index >= 0]] = True
            if np.any(placeholder & ~carried):
                raise WireError("input_ids: placeholder sentinel at a position nothing carries into")
        if np.any((ids < 0) & ~placeholder) or np.any(ids >= vocab_size):
            raise WireError("input_ids: token id outside the vocabulary")
        if np.any(self.carry_index >= 0) and self.carry_from_step < 0:
            raise WireError("carry_index set but carry_from_step is -1")

    def encode(self) -> list:
        specs, frames = _pack_arrays({name: getattr(self, name) for name in PLAN_ARRAYS})
        header = pb.StepPlanHeader(
            step_id=self.step_id, carry_from_step=self.carry_from_step, flush=self.flush, arrays=specs,
            request_ids=self.request_ids,
        )
        return [KIND_PLAN, header.SerializeToString(), *frames]

    @classmethod
    def decode(cls, header: bytes, frames: list) -> StepPlan:
        msg = pb.StepPlanHeader.FromString(header)
        arrays = _unpack_arrays(msg.arrays, frames)
        if list(arrays) != list(PLAN_ARRAYS):
            raise WireError(f"plan arrays {list(arrays)} != {list(PLAN_ARRAYS)}")
        return cls(step_id=msg.step_id, carry_from_step=msg.carry_from_step, flush=msg.flush, **arrays,
                   request_ids=msg.request_ids)


@dataclass
class StepResult:
    """One step's outputs: a sampled token per row (-1 where the row did not sample), timings."""

    step_id: int
    sampled: np.ndarray  # int32 [R]
    compute_ms: float = 0.0
    idle_gap_ms: float = 0.0
    logprob: np.ndarray | None = None  # float32 [R]
    top_ids: np.ndarray | None = None  # int32 [R, K]
    top_logprobs: np.ndarray | None = None  # float32 [R, K]
    extra: dict = field(default_factory=dict)

    def encode(self) -> list:
        arrays = {"sampled": self.sampled}
        for name in ("logprob", "top_ids", "top_logprobs"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        specs, frames = _pack_arrays(arrays)
        header = pb.StepResultHeader(
            step_id=self.step_id, compute_ms=self.compute_ms, idle_gap_ms=self.idle_gap_ms, arrays=specs
        )
        return [KIND_RESULT, header.SerializeToString(), *frames]

    @classmethod
    def decode(cls, header: bytes, frames: list) -> StepResult:
        msg = pb.StepResultHeader.FromString(header)
        arrays = _unpack_arrays(msg.arrays, frames)
        if "sampled" not in arrays or arrays["sampled"].ndim != 1:
            raise WireError("result without a 1-D `sampled` array")
        return cls(
            step_id=msg.step_id,
            sampled=arrays["sampled"],
            compute_ms=msg.compute_ms,
            idle_gap_ms=msg.idle_gap_ms,
            logprob=arrays.get("logprob"),
            top_ids=arrays.get("top_ids"),
            top_logprobs=arrays.get("top_logprobs"),
        )


def flush_message() -> list[bytes]:
    return [KIND_FLUSH, pb.Flush().SerializeToString()]


def split(frames: list) -> tuple[bytes, bytes, list]:
    """Splits a received multipart message into (kind, header, array frames); rejects garbage."""
    if len(frames) < 2:
        raise WireError(f"message of {len(frames)} frames; at least kind and header expected")
    kind = bytes(frames[0])
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind[:16]!r}")
    return kind, bytes(frames[1]), list(frames[2:])
