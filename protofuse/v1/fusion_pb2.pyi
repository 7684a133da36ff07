from protofuse.v1 import bank_pb2 as _bank_pb2
from protofuse.v1 import federation_pb2 as _federation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        FLOAT32: _ClassVar[Tensor.DType]
        FLOAT64: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    FLOAT32: Tensor.DType
    FLOAT64: Tensor.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AdaptRequest(_message.Message):
    __slots__ = ("format_version", "x", "labels", "options", "known_bank_weights_digest", "onnx")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_BANK_WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    x: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.ScalarMap[str, str]
    known_bank_weights_digest: str
    onnx: OnnxExportRequest
    def __init__(self, format_version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., options: _Optional[_Mapping[str, str]] = ..., known_bank_weights_digest: _Optional[str] = ..., onnx: _Optional[_Union[OnnxExportRequest, _Mapping]] = ...) -> None: ...

class OnnxExportRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class OnnxExport(_message.Message):
    __slots__ = ("name", "version", "model_onnx", "labels_txt", "config_pbtxt", "signature_json", "parity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ONNX_FIELD_NUMBER: _ClassVar[int]
    LABELS_TXT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PBTXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_JSON_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    model_onnx: bytes
    labels_txt: bytes
    config_pbtxt: bytes
    signature_json: bytes
    parity: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., model_onnx: _Optional[bytes] = ..., labels_txt: _Optional[bytes] = ..., config_pbtxt: _Optional[bytes] = ..., signature_json: _Optional[bytes] = ..., parity: _Optional[float] = ...) -> None: ...

class AdaptedArtifact(_message.Message):
    __slots__ = ("weights_npz", "meta_json", "signature_json", "bank_weights_digest", "bank_weights_omitted")
    WEIGHTS_NPZ_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_JSON_FIELD_NUMBER: _ClassVar[int]
    BANK_WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BANK_WEIGHTS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    weights_npz: bytes
    meta_json: bytes
    signature_json: bytes
    bank_weights_digest: str
    bank_weights_omitted: bool
    def __init__(self, weights_npz: _Optional[bytes] = ..., meta_json: _Optional[bytes] = ..., signature_json: _Optional[bytes] = ..., bank_weights_digest: _Optional[str] = ..., bank_weights_omitted: _Optional[bool] = ...) -> None: ...

class FitMetrics(_message.Message):
    __slots__ = ("classes", "n_support", "support_accuracy", "seconds", "method", "uncovered_labels")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    N_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    UNCOVERED_LABELS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    n_support: int
    support_accuracy: float
    seconds: float
    method: str
    uncovered_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., n_support: _Optional[int] = ..., support_accuracy: _Optional[float] = ..., seconds: _Optional[float] = ..., method: _Optional[str] = ..., uncovered_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class AdaptResponse(_message.Message):
    __slots__ = ("format_version", "bank_version", "artifact", "metrics", "onnx")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    bank_version: str
    artifact: AdaptedArtifact
    metrics: FitMetrics
    onnx: OnnxExport
    def __init__(self, format_version: _Optional[int] = ..., bank_version: _Optional[str] = ..., artifact: _Optional[_Union[AdaptedArtifact, _Mapping]] = ..., metrics: _Optional[_Union[FitMetrics, _Mapping]] = ..., onnx: _Optional[_Union[OnnxExport, _Mapping]] = ...) -> None: ...

class GetBankRequest(_message.Message):
    __slots__ = ("format_version",)
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    def __init__(self, format_version: _Optional[int] = ...) -> None: ...

class GetBankResponse(_message.Message):
    __slots__ = ("format_version", "manifest", "input_width")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    manifest: _bank_pb2.BankManifest
    input_width: int
    def __init__(self, format_version: _Optional[int] = ..., manifest: _Optional[_Union[_bank_pb2.BankManifest, _Mapping]] = ..., input_width: _Optional[int] = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ("format_version",)
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    def __init__(self, format_version: _Optional[int] = ...) -> None: ...

class ExpertSummary(_message.Message):
    __slots__ = ("expert", "distribution")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    expert: _bank_pb2.ManifestExpert
    distribution: _federation_pb2.ExpertDistribution
    def __init__(self, expert: _Optional[_Union[_bank_pb2.ManifestExpert, _Mapping]] = ..., distribution: _Optional[_Union[_federation_pb2.ExpertDistribution, _Mapping]] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("format_version", "bank_version", "experts")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    bank_version: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertSummary]
    def __init__(self, format_version: _Optional[int] = ..., bank_version: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertSummary, _Mapping]]] = ...) -> None: ...
