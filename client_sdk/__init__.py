"""Client SDK: run next to a private black-box expert; load banks and adapted models.

The Flower ClientApp is ``client_sdk.clientapp.app:app`` (``protofuse client`` starts a SuperNode
for it); experts may be callables, scikit-learn classifiers, torch modules or model servers.

    import client_sdk
    bank = client_sdk.load_bank("runs/demo/bank")
    model = bank.adapt(x_support, y_support)       # y: label names
    model.predict_proba(x)                         # columns in the order of model.classes_
    model.save("model"); client_sdk.load_adapted("model", unsigned_ok=True)   # you made it

    # or ask the deployment's adaptation service; its models are signed and verified
    with client_sdk.FusionClient("host:50051", certs="certs/") as service:
        model = service.adapt(x_support, y_support)

Loading banks and adapting needs only the core install (``pip install protofuse``);
``FusionClient`` and ``FusionError`` need gRPC, from the client extra
(``pip install 'protofuse[client]'``), and are imported when first used.
"""

from typing import TYPE_CHECKING, Any

from protofuse.adapted import AdaptedModel, load_adapted
from protofuse.bank import Bank, load_bank
from protofuse.signing import SignatureError

from .experts import (
    CallableExpert,
    Expert,
    ExpertOutputError,
    SklearnExpert,
    TorchExpert,
    as_expert,
    query_expert,
)
from .model_servers import MLflowExpert, ModelServerError, OpenInferenceExpert, model_server_expert

if TYPE_CHECKING:
    from .fusion_client import FusionClient, FusionError

__all__ = [
    "AdaptedModel",
    "Bank",
    "CallableExpert",
    "Expert",
    "ExpertOutputError",
    "FusionClient",
    "FusionError",
    "MLflowExpert",
    "ModelServerError",
    "OpenInferenceExpert",
    "SignatureError",
    "SklearnExpert",
    "TorchExpert",
    "as_expert",
    "load_adapted",
    "load_bank",
    "model_server_expert",
    "query_expert",
]

# The adaptation service's client imports grpc: only when asked for (PEP 562).
_NEEDS_GRPC = ("FusionClient", "FusionError")


def __getattr__(name: str) -> Any:
    if name not in _NEEDS_GRPC:
        raise AttributeError(f"module 'client_sdk' has no attribute {name!r}")
    try:
        from . import fusion_client
    except ImportError as err:
        if (err.name or "").split(".")[0] not in ("grpc", "grpc_health"):
            raise
        raise ImportError(
            f"client_sdk.{name} needs gRPC ({err.name} is not installed): pip install "
            "'protofuse[client]'",
            name=err.name,
        ) from err
    value = getattr(fusion_client, name)
    globals()[name] = value
    return value
