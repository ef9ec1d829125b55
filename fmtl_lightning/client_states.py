"""Where a pool's clients keep their state between rounds: on disk, one file per client.

:class:`ClientStates` maps a client id to its :class:`~fmtl_lightning.run_artifacts.ClientStore`
(heads, FedBN norms, a personal model; full width). Each client's state is one
safetensors file under the store's directory, in the checkpoint's per-client form
(:meth:`ClientStore.to_arrays`: ``local/<key>``, ``personal/<key>``), written atomically
whenever the pool changes it (:meth:`ClientStates.save`, after a fit or a statistics pass).
A client that never changed has no file: its state is its initial one, built on demand.
At most ``resident`` stores are held in RAM (the most recently read, for a round's
sampled clients); :meth:`ClientStates.release` drops them all. So the RAM a pool needs
does not grow with its number of clients, only the files under its directory do.

A store read through ``states[cid]`` and changed in place is kept only while it stays
resident: call :meth:`ClientStates.save` to keep a change.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fmtl_lightning.errors import FMTLError
from fmtl_lightning.run_artifacts import ClientStore

State = dict[str, np.ndarray]


class ClientStateError(FMTLError, ValueError):
    """A client's state file is unreadable (the message names the file), or the client
    is not in the pool."""


class ClientStates(Mapping[str, ClientStore]):
    """Every client's :class:`ClientStore`, on disk under ``root`` (see the module doc).

    ``cids``: the clients, in order; ``initial(cid)``: a client's state before it ever
    changed (fresh arrays); ``resident``: stores kept in RAM at most (>= 1). State
    files already in ``root`` are removed first: a new pool starts from the initial states.
    """

    def __init__(
        self,
        root: str | Path,
        cids: Sequence[str],
        initial: Callable[[str], ClientStore],
        *,
        resident: int = 16,
    ) -> None:
        if resident < 1:
            raise ClientStateError(f"resident: at least 1 store in RAM, got {resident}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob("*.safetensors"):
            p.unlink()
        self._cids = tuple(cids)
        self._known = frozenset(self._cids)
        self._initial = initial
        self._resident = resident
        self._open: OrderedDict[str, ClientStore] = OrderedDict()

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, cid: str) -> ClientStore:
        if cid not in self._known:
            raise KeyError(cid)
        if cid in self._open:
            self._open.move_to_end(cid)
            return self._open[cid]
        st = ClientStore.from_arrays(self.arrays(cid))
        self._open[cid] = st
        while len(self._open) > self._resident:
            self._open.popitem(last=False)
        return st

    def __iter__(self) -> Iterator[str]:
        return iter(self._cids)

    def __len__(self) -> int:
        return len(self._cids)

    def __contains__(self, cid: object) -> bool:
        return cid in self._known

    # ------------------------------------------------------------------ files
    def path(self, cid: str) -> Path:
        """The file of client ``cid`` (absent while its state is the initial one)."""
        return self.root / f"{cid}.safetensors"

    def arrays(self, cid: str) -> State:
        """Client ``cid``'s state in checkpoint form (:meth:`ClientStore.to_arrays`), as
        it stands: its resident store, else its file, else its initial state."""
        if cid not in self._known:
            raise ClientStateError(f"client {cid!r} is not in this pool")
        if cid in self._open:
            return self._open[cid].to_arrays()
        p = self.path(cid)
        if not p.is_file():
            return self._initial(cid).to_arrays()
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClientStateError(f"client state file {str(p)!r} is unreadable: {exc}") from exc

    def save(self, cid: str, store: ClientStore | None = None) -> None:
        """Write client ``cid``'s state (``store``, default its resident one) to its file,
        atomically; ``store`` becomes its resident store."""
        if cid not in self._known:
            raise ClientStateError(f"client {cid!r} is not in this pool")
        st = self[cid] if store is None else store
        self._open[cid] = st
        self._open.move_to_end(cid)
        arrays = {k: np.ascontiguousarray(v) if v.ndim else v.copy()
                  for k, v in st.to_arrays().items()}  # fmt: skip
        fd, tmp = tempfile.mkstemp(prefix=f".{cid}.", dir=self.root)
        os.close(fd)
        try:
            save_file(arrays, tmp)
            os.replace(tmp, self.path(cid))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        while len(self._open) > self._resident:
            self._open.popitem(last=False)

    def resident_ids(self) -> tuple[str, ...]:
        """The clients whose store is in RAM now (least recently read first)."""
        return tuple(self._open)

    def release(self) -> None:
        """Drop every resident store (their states are on disk, or initial)."""
        self._open.clear()


class CheckpointFiles(Mapping[str, State]):
    """The checkpoint form of the clients ``cids`` of ``states``, each read when asked
    for (a checkpoint writes them one by one, never all in RAM at once)."""

    def __init__(self, states: ClientStates, cids: Sequence[str]) -> None:
        self._states = states
        self._cids = tuple(cids)
        self._known = frozenset(self._cids)

    def __getitem__(self, cid: str) -> State:
        if cid not in self._known:
            raise KeyError(cid)
        return self._states.arrays(cid)

    def __iter__(self) -> Iterator[str]:
        return iter(self._cids)

    def __len__(self) -> int:
        return len(self._cids)
