"""The adaptation service: ``protofuse.v1.Fusion`` over gRPC beside the bank (Adapt, GetBank,
ListExperts), its limits and the bank version it serves."""
