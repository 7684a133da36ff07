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
"""

from protofuse.adapted import AdaptedModel, load_adapted
from protofuse.bank import Bank, load_bank

from .fusion_client import FusionClient, FusionError, SignatureError
from .experts import CallableExpert, Expert, ExpertOutputError, SklearnExpert, TorchExpert, as_expert, query_expert
from .model_servers import MLflowExpert, ModelServerError, OpenInferenceExpert, model_server_expert

__all__ = [
    "AdaptedModel", "Bank", "CallableExpert", "Expert", "ExpertOutputError", "SklearnExpert", "TorchExpert",
    "FusionClient", "FusionError", "SignatureError", "MLflowExpert", "ModelServerError", "OpenInferenceExpert", "as_expert", "load_adapted", "load_bank", "model_server_expert", "query_expert",
]
