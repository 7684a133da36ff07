"""The wire codecs: the only code that touches the generated protobuf classes (``protofuse.v1``).

- ``federation``: what a client and the fusion server exchange (node description, round plan,
  prototype-distribution message, imitator statistics) and the bank manifest;
- ``service``: the adaptation service's requests and replies.

Everything else works with the plain dataclasses these modules define.
"""
