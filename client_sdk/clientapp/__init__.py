"""The Flower ClientApp (``client_sdk.clientapp.app:app``) and one client's local round
(``local_training``): what a SuperNode runs next to an organization's expert."""
