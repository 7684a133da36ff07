"""protofuse: fuse black-box experts into a bank of task-agnostic prototypes."""
