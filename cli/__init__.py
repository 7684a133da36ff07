"""The ``protofuse`` command (imported as ``protofuse_cli``): the top layer over the SDK
(``client_sdk``), the server (``protofuse_server``) and the core (``protofuse``), with no logic of
its own. ``protofuse_cli.main:main`` is the console script."""
