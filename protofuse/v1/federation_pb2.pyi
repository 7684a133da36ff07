from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_CONSENSUS: _ClassVar[Phase]
    PHASE_AGREEMENT: _ClassVar[Phase]
    PHASE_WEIGHTED: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PHASE_CONSENSUS: Phase
PHASE_AGREEMENT: Phase
PHASE_WEIGHTED: Phase

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

class InputRange(_message.Message):
    __slots__ = ("lo", "hi")
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    lo: float
    hi: float
    def __init__(self, lo: _Optional[float] = ..., hi: _Optional[float] = ...) -> None: ...

class NodeDescription(_message.Message):
    __slots__ = ("format_version", "pseudonym", "label_names", "x_dim", "n_queries", "x_range")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    X_DIM_FIELD_NUMBER: _ClassVar[int]
    N_QUERIES_FIELD_NUMBER: _ClassVar[int]
    X_RANGE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pseudonym: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    x_dim: int
    n_queries: int
    x_range: InputRange
    def __init__(self, format_version: _Optional[int] = ..., pseudonym: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., x_dim: _Optional[int] = ..., n_queries: _Optional[int] = ..., x_range: _Optional[_Union[InputRange, _Mapping]] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("format_version", "round", "phase", "phase_round", "phase_rounds", "vocabulary", "model_json", "training_json", "federation_json")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JSON_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_JSON_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    round: int
    phase: Phase
    phase_round: int
    phase_rounds: int
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    model_json: str
    training_json: str
    federation_json: str
    def __init__(self, format_version: _Optional[int] = ..., round: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., phase_round: _Optional[int] = ..., phase_rounds: _Optional[int] = ..., vocabulary: _Optional[_Iterable[str]] = ..., model_json: _Optional[str] = ..., training_json: _Optional[str] = ..., federation_json: _Optional[str] = ...) -> None: ...

class LabelRows(_message.Message):
    __slots__ = ("labels", "dim", "prototypes", "bias")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    prototypes: _containers.RepeatedScalarFieldContainer[float]
    bias: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., prototypes: _Optional[_Iterable[float]] = ..., bias: _Optional[_Iterable[float]] = ...) -> None: ...

class ExpertRows(_message.Message):
    __slots__ = ("format_version", "pseudonym", "round", "rows")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pseudonym: str
    round: int
    rows: LabelRows
    def __init__(self, format_version: _Optional[int] = ..., pseudonym: _Optional[str] = ..., round: _Optional[int] = ..., rows: _Optional[_Union[LabelRows, _Mapping]] = ...) -> None: ...

class ReviewCandidate(_message.Message):
    __slots__ = ("id", "rows")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    id: int
    rows: LabelRows
    def __init__(self, id: _Optional[int] = ..., rows: _Optional[_Union[LabelRows, _Mapping]] = ...) -> None: ...

class PeerReview(_message.Message):
    __slots__ = ("format_version", "round", "candidates")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    round: int
    candidates: _containers.RepeatedCompositeFieldContainer[ReviewCandidate]
    def __init__(self, format_version: _Optional[int] = ..., round: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[ReviewCandidate, _Mapping]]] = ...) -> None: ...

class ReviewScores(_message.Message):
    __slots__ = ("format_version", "pseudonym", "round", "candidate", "score")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pseudonym: str
    round: int
    candidate: _containers.RepeatedScalarFieldContainer[int]
    score: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, format_version: _Optional[int] = ..., pseudonym: _Optional[str] = ..., round: _Optional[int] = ..., candidate: _Optional[_Iterable[int]] = ..., score: _Optional[_Iterable[float]] = ...) -> None: ...
