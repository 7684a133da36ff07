"""The server side (imported as ``protofuse_server``): ``fusion/`` is the Flower ServerApp that
federates the bank; ``service/`` is the gRPC adaptation service that serves it; ``certs`` makes a
deployment's certificates and keys."""
