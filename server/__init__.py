"""The fusion server (imported as ``protofuse_server``): Flower ServerApp, strategy, bank store."""
