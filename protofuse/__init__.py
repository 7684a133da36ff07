"""protofuse: fuse black-box experts into a bank of task-agnostic prototypes.

The core both sides of a federation import: the model (``model/``, torch only), the prototype
families (``families/``), the bank and adapted models, training and its two-phase schedule, the
wire codecs (``protocol/``), artifacts, signatures and durable writes, the spec and settings, and
Flower's processes (``flower/``: launcher and simulation).
"""

__version__ = "0.2.0"
