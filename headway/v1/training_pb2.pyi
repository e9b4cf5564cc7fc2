from headway.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("model", "data", "loss_fn", "loss_fn_config", "group_size", "normalize_std", "request_id", "kl_penalty")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_STD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KL_PENALTY_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: _containers.RepeatedCompositeFieldContainer[_common_pb2.TrainingItem]
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    group_size: int
    normalize_std: bool
    request_id: str
    kl_penalty: KlPenalty
    def __init__(self, model: _Optional[str] = ..., data: _Optional[_Iterable[_Union[_common_pb2.TrainingItem, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., group_size: _Optional[int] = ..., normalize_std: _Optional[bool] = ..., request_id: _Optional[str] = ..., kl_penalty: _Optional[_Union[KlPenalty, _Mapping]] = ...) -> None: ...

class KlPenalty(_message.Message):
    __slots__ = ("coef", "reference")
    COEF_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    coef: float
    reference: str
    def __init__(self, coef: _Optional[float] = ..., reference: _Optional[str] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("logprobs", "metrics", "num_datums", "num_tokens")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_DATUMS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    metrics: _containers.ScalarMap[str, float]
    num_datums: int
    num_tokens: int
    def __init__(self, logprobs: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_datums: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ForwardCustomRequest(_message.Message):
    __slots__ = ("model", "data", "group_size", "normalize_std", "request_id", "reference")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_STD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: _containers.RepeatedCompositeFieldContainer[_common_pb2.TrainingItem]
    group_size: int
    normalize_std: bool
    request_id: str
    reference: str
    def __init__(self, model: _Optional[str] = ..., data: _Optional[_Iterable[_Union[_common_pb2.TrainingItem, _Mapping]]] = ..., group_size: _Optional[int] = ..., normalize_std: _Optional[bool] = ..., request_id: _Optional[str] = ..., reference: _Optional[str] = ...) -> None: ...

class ForwardCustomResponse(_message.Message):
    __slots__ = ("forward_id", "data")
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    forward_id: str
    data: _containers.RepeatedCompositeFieldContainer[DatumTensors]
    def __init__(self, forward_id: _Optional[str] = ..., data: _Optional[_Iterable[_Union[DatumTensors, _Mapping]]] = ...) -> None: ...

class DatumTensors(_message.Message):
    __slots__ = ("logprobs", "target_tokens", "sampling_logprobs", "mask", "advantages", "reward", "advantage", "group_index", "reference_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.Tensor
    target_tokens: _common_pb2.Tensor
    sampling_logprobs: _common_pb2.Tensor
    mask: _common_pb2.Tensor
    advantages: _common_pb2.Tensor
    reward: float
    advantage: float
    group_index: int
    reference_logprobs: _common_pb2.Tensor
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., target_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sampling_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., advantages: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., reward: _Optional[float] = ..., advantage: _Optional[float] = ..., group_index: _Optional[int] = ..., reference_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardCustomRequest(_message.Message):
    __slots__ = ("model", "forward_id", "weights", "metrics", "request_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    forward_id: str
    weights: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    metrics: _containers.ScalarMap[str, float]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., forward_id: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BackwardCustomResponse(_message.Message):
    __slots__ = ("metrics", "num_datums", "num_tokens")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_DATUMS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    num_datums: int
    num_tokens: int
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ..., num_datums: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("model", "adam", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    adam: _common_pb2.AdamParams
    request_id: str
    def __init__(self, model: _Optional[str] = ..., adam: _Optional[_Union[_common_pb2.AdamParams, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("step", "checkpoint", "sampler_path", "state_path", "checkpoint_info")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INFO_FIELD_NUMBER: _ClassVar[int]
    step: int
    checkpoint: str
    sampler_path: str
    state_path: str
    checkpoint_info: _common_pb2.Checkpoint
    def __init__(self, step: _Optional[int] = ..., checkpoint: _Optional[str] = ..., sampler_path: _Optional[str] = ..., state_path: _Optional[str] = ..., checkpoint_info: _Optional[_Union[_common_pb2.Checkpoint, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model", "data", "loss_fn", "loss_fn_config", "group_size", "normalize_std", "adam", "request_id", "kl_penalty")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_STD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KL_PENALTY_FIELD_NUMBER: _ClassVar[int]
    model: str
    data: _containers.RepeatedCompositeFieldContainer[_common_pb2.TrainingItem]
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    group_size: int
    normalize_std: bool
    adam: _common_pb2.AdamParams
    request_id: str
    kl_penalty: KlPenalty
    def __init__(self, model: _Optional[str] = ..., data: _Optional[_Iterable[_Union[_common_pb2.TrainingItem, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., group_size: _Optional[int] = ..., normalize_std: _Optional[bool] = ..., adam: _Optional[_Union[_common_pb2.AdamParams, _Mapping]] = ..., request_id: _Optional[str] = ..., kl_penalty: _Optional[_Union[KlPenalty, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("forward_backward", "optim_step")
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    forward_backward: ForwardBackwardResponse
    optim_step: OptimStepResponse
    def __init__(self, forward_backward: _Optional[_Union[ForwardBackwardResponse, _Mapping]] = ..., optim_step: _Optional[_Union[OptimStepResponse, _Mapping]] = ...) -> None: ...

class AvailableLossesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class AvailableLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "description", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    config: _containers.RepeatedCompositeFieldContainer[LossConfigKey]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., config: _Optional[_Iterable[_Union[LossConfigKey, _Mapping]]] = ...) -> None: ...

class LossConfigKey(_message.Message):
    __slots__ = ("name", "default_value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_value: float
    description: str
    def __init__(self, name: _Optional[str] = ..., default_value: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...
