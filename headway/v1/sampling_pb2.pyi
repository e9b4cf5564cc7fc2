from headway.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_STOP: _ClassVar[StopReason]
    STOP_REASON_LENGTH: _ClassVar[StopReason]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_STOP: StopReason
STOP_REASON_LENGTH: StopReason

class SampleRequest(_message.Message):
    __slots__ = ("model", "prompt_tokens", "prompt_text", "params", "checkpoint", "include_prompt_logprobs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: _common_pb2.Tensor
    prompt_text: str
    params: _common_pb2.SamplingParams
    checkpoint: str
    include_prompt_logprobs: bool
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_text: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., checkpoint: _Optional[str] = ..., include_prompt_logprobs: _Optional[bool] = ...) -> None: ...

class SampledSequence(_message.Message):
    __slots__ = ("tokens", "logprobs", "text", "stop_reason", "top_token_ids", "top_logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    logprobs: _common_pb2.Tensor
    text: str
    stop_reason: StopReason
    top_token_ids: _common_pb2.Tensor
    top_logprobs: _common_pb2.Tensor
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., text: _Optional[str] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., top_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("sequences", "prompt_tokens", "prompt_logprobs", "checkpoint", "model", "prompt_top_token_ids", "prompt_top_logprobs")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SampledSequence]
    prompt_tokens: _common_pb2.Tensor
    prompt_logprobs: _common_pb2.Tensor
    checkpoint: str
    model: str
    prompt_top_token_ids: _common_pb2.Tensor
    prompt_top_logprobs: _common_pb2.Tensor
    def __init__(self, sequences: _Optional[_Iterable[_Union[SampledSequence, _Mapping]]] = ..., prompt_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., checkpoint: _Optional[str] = ..., model: _Optional[str] = ..., prompt_top_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_top_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("index", "tokens", "logprobs", "text", "stop_reason", "prompt_tokens", "checkpoint", "prompt_logprobs", "top_token_ids", "top_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    tokens: _common_pb2.Tensor
    logprobs: _common_pb2.Tensor
    text: str
    stop_reason: StopReason
    prompt_tokens: _common_pb2.Tensor
    checkpoint: str
    prompt_logprobs: _common_pb2.Tensor
    top_token_ids: _common_pb2.Tensor
    top_logprobs: _common_pb2.Tensor
    prompt_top_token_ids: _common_pb2.Tensor
    prompt_top_logprobs: _common_pb2.Tensor
    def __init__(self, index: _Optional[int] = ..., tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., text: _Optional[str] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., prompt_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., checkpoint: _Optional[str] = ..., prompt_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_top_token_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_top_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComputeLogprobsRequest(_message.Message):
    __slots__ = ("model", "checkpoint", "sequences")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    sequences: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class ComputeLogprobsResponse(_message.Message):
    __slots__ = ("logprobs", "checkpoint")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    checkpoint: str
    def __init__(self, logprobs: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., checkpoint: _Optional[str] = ...) -> None: ...
