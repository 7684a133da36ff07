"""Client SDK: run next to a private black-box expert; load banks and adapted models.

    import client_sdk
    bank = client_sdk.load_bank("runs/demo/bank")
    model = bank.adapt(x_support, y_support)       # y: label names
    model.predict_proba(x)                         # columns in the order of model.classes_
    model.save("model"); client_sdk.load_adapted("model")
"""

from protofuse.adapted import AdaptedModel, load_adapted
from protofuse.bank import Bank, load_bank

from .experts import CallableExpert, Expert, ExpertOutputError, SklearnExpert, TorchExpert, as_expert, query_expert

__all__ = [
    "AdaptedModel", "Bank", "CallableExpert", "Expert", "ExpertOutputError", "SklearnExpert", "TorchExpert",
    "as_expert", "load_adapted", "load_bank", "query_expert",
]
