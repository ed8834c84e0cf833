"""Small run-infrastructure helpers shared by the training loop, the pipelines and the CLIs, one module per
concern (all domain-free):

* :mod:`.devices`: devices, moving batches, seeding, ``torchrun`` (DDP) setup;
* :mod:`.files`: atomic file writes, checkpoint I/O with ``weights_only=True``;
* :mod:`.logs`: JSON-lines metric logs;
* :mod:`.plotting`: loss-curve pictures;
* :mod:`.resources`: the shipped folders and the ``shared`` data folder.

Every name is re-exported here (``from kflow.utils import atomic_save``).
"""
from .devices import (
                    DistInfo,
                    distributed_setup,
                    distributed_teardown,
                    resolve_device,
                    seed_everything,
                    step_seed,
                    to_device,
)
from .files import (
                    CheckpointError,
                    atomic_save,
                    atomic_write,
                    atomic_write_text,
                    check_weights_only_safe,
                    load_checkpoint,
                    save_checkpoint,
)
from .logs import JsonlLogger, read_jsonl
from .plotting import plot_curves
from .resources import resource_dir, shared_dir

__all__ = [
    "CheckpointError",
    "DistInfo",
    "JsonlLogger",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_weights_only_safe",
    "distributed_setup",
    "distributed_teardown",
    "load_checkpoint",
    "plot_curves",
    "read_jsonl",
    "resolve_device",
    "resource_dir",
    "save_checkpoint",
    "seed_everything",
    "shared_dir",
    "step_seed",
    "to_device",
]
