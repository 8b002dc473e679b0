"""Who is online: registered clients by id, with epochs and reservations (§3.1, §3.2).

Pure bookkeeping, no I/O. An entry is added only after its confirmation went out (REG-7) and is
removed only by the connection epoch that added it (DUP-5).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import attrs

from ._messages import ClientType

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._connection import Connection


_epochs = itertools.count(1)


@attrs.define(eq=False)
class ClientEntry:
    """One registered connection (REG-8). The pinned identity is id, role and target_id."""

    client_id: str
    role: ClientType
    platform: str
    metadata: dict[str, Any] | None
    system_info: dict[str, Any] | None
    target_id: str | None
    connection: Connection
    connected_at: float
    epoch: int = attrs.field(factory=lambda: next(_epochs))
    #: Wall-clock registration time (WIRE-7), taken once (GET /api/devices, the task history).
    registered_at: str = ""
    #: Trio time of the last heartbeat frame (None: none yet); shown as wall clock on read.
    last_heartbeat: float | None = None

    @property
    def is_device(self) -> bool:
        return self.role is ClientType.DEVICE


@attrs.define(eq=False)
class Registry:
    """Registered clients in registration order, plus ids reserved by a pending registration."""

    _entries: dict[str, ClientEntry] = attrs.field(factory=dict)
    _reserved: set[str] = attrs.field(factory=set)

    def get(self, client_id: str) -> ClientEntry | None:
        return self._entries.get(client_id)

    def is_reserved(self, client_id: str) -> bool:
        return client_id in self._reserved

    def reserve(self, client_id: str) -> None:
        """REG-6: hold an id from the duplicate check until the verdict."""
        assert client_id not in self._reserved
        self._reserved.add(client_id)

    def release(self, client_id: str) -> None:
        self._reserved.discard(client_id)

    def add(self, entry: ClientEntry) -> None:
        assert entry.client_id not in self._entries, "duplicate check must run first"
        self._entries[entry.client_id] = entry

    def remove(self, entry: ClientEntry) -> bool:
        """Remove `entry` only if the id still maps to this very epoch (DUP-5)."""
        if self._entries.get(entry.client_id) is entry:
            del self._entries[entry.client_id]
            return True
        return False

    def online_ids(self) -> list[str]:
        """Every registered id, both roles, in registration order (HTTP-1)."""
        return list(self._entries)

    def __iter__(self) -> Iterator[ClientEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
