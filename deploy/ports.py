"""Free loopback ports for the servers we start, chosen where no one else will be handed them.

A port found by binding to port 0 is free only until the socket closes: the kernel may hand the
same number to the next bind to port 0. `bentoml serve` binds two of those itself before it
listens on ours (circus's control and pub/sub endpoints), so a port taken from the kernel's
ephemeral range can be gone by the time the server wants it ("Address already in use"). Ports
below that range are never handed out by the kernel, to servers or to outgoing connections, so
one that is free when chosen stays ours unless someone asks for it by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Below the ephemeral range and above the well-known services: Linux's range starts at 32768.
LOWEST = 20000
ATTEMPTS = 200

# Ports this process has handed out: two servers started one after another must not both get
# one before either binds it.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, from below the ephemeral range where there is room."""
    first_ephemeral = _first_ephemeral_port()
    if first_ephemeral - LOWEST >= 1000:
        for _ in range(ATTEMPTS):
            port = random.randrange(LOWEST, first_ephemeral)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    # No room below the range (or all taken): the kernel's choice, the best there is.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


def _first_ephemeral_port() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # IANA's dynamic range, used by macOS and Windows


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
