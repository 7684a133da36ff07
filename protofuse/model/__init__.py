"""The prototype models (torch only: no Flower, gRPC or files)."""
