from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fidelity(_message.Message):
    __slots__ = ("agreement", "kl", "n")
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    agreement: float
    kl: float
    n: int
    def __init__(self, agreement: _Optional[float] = ..., kl: _Optional[float] = ..., n: _Optional[int] = ...) -> None: ...

class DiscriminativeHead(_message.Message):
    __slots__ = ("log_temperature", "label_bias")
    LOG_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LABEL_BIAS_FIELD_NUMBER: _ClassVar[int]
    log_temperature: float
    label_bias: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, log_temperature: _Optional[float] = ..., label_bias: _Optional[_Iterable[float]] = ...) -> None: ...

class Gaussian(_message.Message):
    __slots__ = ("mean", "covariance")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    covariance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., covariance: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerativeMoments(_message.Message):
    __slots__ = ("prior", "posterior")
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    prior: Gaussian
    posterior: Gaussian
    def __init__(self, prior: _Optional[_Union[Gaussian, _Mapping]] = ..., posterior: _Optional[_Union[Gaussian, _Mapping]] = ...) -> None: ...

class ExpertDistribution(_message.Message):
    __slots__ = ("format_version", "pseudonym", "label_names", "round", "discriminative", "generative")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DISCRIMINATIVE_FIELD_NUMBER: _ClassVar[int]
    GENERATIVE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pseudonym: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    round: int
    discriminative: DiscriminativeHead
    generative: GenerativeMoments
    def __init__(self, format_version: _Optional[int] = ..., pseudonym: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., discriminative: _Optional[_Union[DiscriminativeHead, _Mapping]] = ..., generative: _Optional[_Union[GenerativeMoments, _Mapping]] = ...) -> None: ...

class ImitatorStats(_message.Message):
    __slots__ = ("format_version", "pseudonym", "round", "n_examples", "n_queries", "fidelity", "consensus_agreement", "loss")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    N_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_QUERIES_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pseudonym: str
    round: int
    n_examples: int
    n_queries: int
    fidelity: Fidelity
    consensus_agreement: float
    loss: float
    def __init__(self, format_version: _Optional[int] = ..., pseudonym: _Optional[str] = ..., round: _Optional[int] = ..., n_examples: _Optional[int] = ..., n_queries: _Optional[int] = ..., fidelity: _Optional[_Union[Fidelity, _Mapping]] = ..., consensus_agreement: _Optional[float] = ..., loss: _Optional[float] = ...) -> None: ...
