"""What ``fit`` leaves on disk and how it is read back: the run folder's files
(:mod:`.folder`), atomic writes and safe loads (:mod:`.files`), and the one loader of trained
encoders from runs and exports (:mod:`.loader`). Neither Lightning nor the application is
needed to read a run."""

from barlowtwins.runs.files import CheckpointError, atomic_write, safe_load, save_encoder
from barlowtwins.runs.folder import RunFolder
from barlowtwins.runs.loader import TrainedEncoder, load_pretrained, load_trained_encoder

__all__ = [
    "CheckpointError",
    "RunFolder",
    "TrainedEncoder",
    "atomic_write",
    "load_pretrained",
    "load_trained_encoder",
    "safe_load",
    "save_encoder",
]
