from protofuse.v1 import federation_pb2 as _federation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ManifestExpert(_message.Message):
    __slots__ = ("pseudonym", "label_names", "trust", "fidelity", "consensus_agreement", "n_examples", "n_queries", "last_round")
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    N_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_QUERIES_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    pseudonym: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    trust: float
    fidelity: _federation_pb2.Fidelity
    consensus_agreement: float
    n_examples: int
    n_queries: int
    last_round: int
    def __init__(self, pseudonym: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., trust: _Optional[float] = ..., fidelity: _Optional[_Union[_federation_pb2.Fidelity, _Mapping]] = ..., consensus_agreement: _Optional[float] = ..., n_examples: _Optional[int] = ..., n_queries: _Optional[int] = ..., last_round: _Optional[int] = ...) -> None: ...

class BankManifest(_message.Message):
    __slots__ = ("format_version", "version", "round", "vocabulary", "weights_digest", "family", "experts")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    version: str
    round: int
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    weights_digest: str
    family: str
    experts: _containers.RepeatedCompositeFieldContainer[ManifestExpert]
    def __init__(self, format_version: _Optional[int] = ..., version: _Optional[str] = ..., round: _Optional[int] = ..., vocabulary: _Optional[_Iterable[str]] = ..., weights_digest: _Optional[str] = ..., family: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ManifestExpert, _Mapping]]] = ...) -> None: ...
