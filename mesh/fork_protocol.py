"""The messages between the local launcher and its worker fork server, defined once.

They travel over a ``SOCK_SEQPACKET`` unix socket pair that the launcher makes and hands the
server at its start (controller/fork_client.py, worker/forkserver.py): one message per
packet, msgpack, a ``kind`` tag. The pair is private to a parent and its child, both trusted,
and is never exposed on a network: nothing else reads these.

| kind | from | fields | ancillary data |
| --- | --- | --- | --- |
| ``ready`` | server, once | its ``pid``, the bytes a child's title may take | |
| ``spawn`` | launcher | an ``id``, the worker's ``argv``, ``env`` and ``cwd`` | |
| ``spawned`` | server | the ``id`` answered, the child's ``pid`` | the child's pidfd |
| ``refused`` | server | the ``id`` answered, why the server will not fork it | |
| ``exited`` | server | a child's ``pid`` and ``returncode`` (negative: the signal) | |

A ``spawned`` always comes before the ``exited`` of the same pid (the server is one thread:
it answers before it reaps). The pidfd rides with ``spawned`` so the launcher can signal the
child without ever hitting a recycled pid, and see it end if the server is gone.
"""

from __future__ import annotations

import msgspec

# A spawn carries the worker's whole environment: a few KiB as a rule; far more is refused.
MAX_PACKET_BYTES = 256 * 1024


class Ready(msgspec.Struct, frozen=True, tag_field="kind", tag="ready"):
    pid: int
    title_room: int  # bytes a child's command line may take (NULs between arguments included)


class Spawn(msgspec.Struct, frozen=True, tag_field="kind", tag="spawn"):
    id: int
    argv: list[str]  # what a plain start would run: [python, "-m", "worker", ...]
    env: dict[str, str]
    cwd: str


class Spawned(msgspec.Struct, frozen=True, tag_field="kind", tag="spawned"):
    id: int
    pid: int


class Refused(msgspec.Struct, frozen=True, tag_field="kind", tag="refused"):
    id: int
    reason: str


class Exited(msgspec.Struct, frozen=True, tag_field="kind", tag="exited"):
    pid: int
    returncode: int  # as asyncio and subprocess give it: -N for a signal N


ToServer = Spawn
FromServer = Ready | Spawned | Refused | Exited

_encoder = msgspec.msgpack.Encoder()
_to_server = msgspec.msgpack.Decoder(ToServer)
_from_server = msgspec.msgpack.Decoder(FromServer)


def encode(message: ToServer | FromServer) -> bytes:
    return _encoder.encode(message)


def decode_to_server(packet: bytes) -> ToServer:
    """Raises msgspec.DecodeError (a ValueError) for a packet that is not a ``spawn``."""
    return _to_server.decode(packet)


def decode_from_server(packet: bytes) -> FromServer:
    """Raises msgspec.DecodeError (a ValueError) for a packet that is no server message."""
    return _from_server.decode(packet)
