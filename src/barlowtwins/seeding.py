"""Counter-based seeds: each random stream of a run is a pure function of its keys.

A stream keyed by ``(seed, rank, step)`` gives every process of a data-parallel run its own
draws, gives a rerun with the same seed the same draws, and lets a resumed run continue
exactly where the interrupted one was without any saved generator state: the step number
restored from the checkpoint is the whole state. JAX's ``fold_in`` works the same way.
"""

from __future__ import annotations

import hashlib


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed that mixes ``keys`` (Python's ``hash`` differs between processes).

    Args:
        keys: What names the stream, e.g. the run's seed, a purpose, the rank and the step.

    Returns:
        A seed for ``torch.Generator.manual_seed``; other keys give unrelated seeds.
    """
    digest = hashlib.blake2b(":".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


__all__ = ["derived_seed"]
