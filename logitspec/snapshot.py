"""A drafter's learned state, saved and put back: what it carries from one question to the next
(an n-gram pool over earlier answers, suffix trees, remembered successors, acceptance
statistics, a gate's timings).

A measurement taken again later (a re-run of a disturbed question) answers the same text only
if its drafter starts from the state the first measurement started from: in half precision a
different tree rounds differently, and the answer can change. :func:`take` copies the state
(everything reachable from the object, by value) except the ``torch.nn.Module`` objects it
refers to, which are weights that decoding never changes: those are kept by reference, so a
snapshot of a drafter holding the target's LM head or a draft model costs only its own
tables. :meth:`Snapshot.restore` builds an independent copy each time it is called. A
snapshot lives in memory only: it is never written to or read from a file, so the rule that
nothing is loaded from a pickle on disk holds.

Example::

    state = snapshot.take(decoder.drafter)   # before question 7
    ...                                      # questions 7 to 48 change the drafter
    decoder.drafter = state.restore()        # question 7 again, from the same state
"""

from __future__ import annotations

import io
import pickle
import zlib
from dataclasses import dataclass
from typing import Any

import torch

COMPRESSION_LEVEL = 1  # tables of unknown entries shrink a hundredfold even at the fastest level


class SnapshotError(TypeError):
    """The object holds something that cannot be copied (a lambda, an open file, a lock)."""


@dataclass(frozen=True)
class Snapshot:
    """A compressed pickle of an object's state; ``shared``: the modules it refers to, kept by
    reference (in the order the pickle numbers them)."""

    data: bytes
    shared: tuple[torch.nn.Module, ...]

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def restore(self) -> Any:
        """A new copy of the object as it was when taken, its modules the same objects."""
        return _Unpickler(io.BytesIO(zlib.decompress(self.data)), self.shared).load()


def take(obj: Any) -> Snapshot:
    """A snapshot of ``obj`` (module docstring); :class:`SnapshotError` when part of it cannot
    be pickled."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"cannot save the state of {type(obj).__name__}: {exc}") from None
    return Snapshot(zlib.compress(buffer.getvalue(), COMPRESSION_LEVEL), tuple(pickler.shared))


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shared: list[torch.nn.Module] = []
        self._index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.nn.Module):
            return None
        key = id(obj)
        if key not in self._index:
            self._index[key] = len(self.shared)
            self.shared.append(obj)
        return self._index[key]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: tuple[torch.nn.Module, ...]) -> None:
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, pid: Any) -> torch.nn.Module:
        return self.shared[pid]
