"""Flower's processes, started by both sides: the launcher (SuperLink, SuperNode, the Flower CLI)
and the simulation of a whole federation (``protofuse simulate``). The Flower app folder (``app/``)
names the ServerApp and ClientApp by import path; nothing here imports either side."""
