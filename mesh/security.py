"""ZeroMQ CURVE on every socket, with pyzmq's own ZAP authenticator.

With ``[security] curve = true`` the controller's three ROUTER sockets are CURVE servers, each in
a ZAP domain of its own (``client``, ``worker``, ``admin``). pyzmq's ``ThreadAuthenticator``
answers the handshakes; it asks ``KeyRing`` whether a client key may connect on that domain,
and the key ring holds the public keys found in each domain's folder (``client_keys``,
``worker_keys``, ``admin_keys``). A peer whose key is not there gets nothing: the handshake
fails and ZeroMQ drops the connection before any message is read.

Keys are ``zmq.auth`` certificate files (``meshctl keys generate NAME``: ``NAME.key`` holds the
public key, ``NAME.key_secret`` both). The key ring re-reads its folders on ``reload()``: the
controller calls it on SIGHUP and when a folder's contents change (checked every second), so
revoking a key is deleting its file. A revoked key cannot connect again, and the connections it
opened before get nothing more either: ZeroMQ authenticates at the handshake only, so the
controller also checks the sender's key (its ``User-Id``) of every message on every port
against the key ring as last read (``Guard.admits``) and drops the revoked ones, from the next
message on. A revoked worker then falls silent and is declared dead; a revoked admin's or
client's requests go unanswered.

Workers the local launcher starts are the controller's own children: they use the
controller's key pair, which the key ring always allows on the worker domain.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

DOMAINS = ("client", "worker", "admin")


class KeyFileError(ConfigError):
    """A key file that cannot be read (named in the message)."""


def read_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; raises KeyFileError naming the file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key pair {str(path)!r}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{str(path)!r} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def read_public_key(path: str | Path) -> bytes:
    """The public key from a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the public key {str(path)!r}: {exc}") from None
    return public


def generate(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in ``directory``; return both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a CURVE client needs: its own key pair and the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, key: str | Path, server_key: str | Path) -> ClientKeys:
        public, secret = read_key_pair(key)
        return cls(public, secret, read_public_key(server_key))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the server (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


def client_keys(key: str | Path | None, server_key: str | Path | None) -> ClientKeys | None:
    """Both files, or neither (no CURVE); one without the other is an error."""
    if not key and not server_key:
        return None
    if not key or not server_key:
        raise KeyFileError("CURVE needs both a key pair (--key, key=) and the controller's public "
                        "key (--controller-key, controller_key=)")
    return ClientKeys.load(key, server_key)


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """A CURVE server's key pair and the ZAP domain of one socket."""

    public: bytes
    secret: bytes
    domain: str

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server in ``domain`` (before it binds)."""
        sock.zap_domain = self.domain.encode()
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class KeyRing:
    """The public keys allowed on each domain, read from folders; pyzmq's authenticator
    thread calls ``callback``, the controller's loop calls ``reload`` (swapped atomically)."""

    def __init__(self, folders: dict[str, Path], always: dict[str, set[bytes]] | None = None
                 ) -> None:
        self._folders = folders
        self._always = always or {}
        self._allowed: dict[str, frozenset[bytes]] = {}
        self._stamp: tuple[Any, ...] = ()
        self.reload()

    def reload(self) -> bool:
        """Re-read every folder; True when the allowed keys changed."""
        allowed: dict[str, frozenset[bytes]] = {}
        for domain, folder in self._folders.items():
            keys = set(self._always.get(domain, set()))
            if folder.is_dir():
                keys.update(zmq.auth.load_certificates(str(folder)))
            allowed[domain] = frozenset(keys)
        changed = allowed != self._allowed
        self._allowed = allowed
        self._stamp = self._folder_stamp()
        return changed

    def stale(self) -> bool:
        """Whether a folder changed since the last reload (names, sizes, times of its files)."""
        return self._folder_stamp() != self._stamp

    def _folder_stamp(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for domain, folder in sorted(self._folders.items()):
            try:
                entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                 for e in os.scandir(folder) if e.is_file())
            except OSError:
                entries = []
            stamp.append((domain, tuple(entries)))
        return tuple(stamp)

    def count(self, domain: str) -> int:
        return len(self._allowed.get(domain, ()))

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may this z85 public key connect on ``domain``?"""
        return key in self._allowed.get(domain, frozenset())


class Guard:
    """The running authenticator: started before the sockets bind, stopped after they close."""

    def __init__(self, context: zmq.Context[Any], ring: KeyRing) -> None:
        self.ring = ring
        self._lock = threading.Lock()
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("mesh.security.zap"))
        self._auth.start()
        for domain in DOMAINS:
            self._auth.configure_curve_callback(domain, credentials_provider=ring)

    def reload(self) -> bool:
        with self._lock:
            changed = self.ring.reload()
        if changed:
            log.info("[controller] CURVE keys reloaded: %s",
                     ", ".join(f"{d} {self.ring.count(d)}" for d in DOMAINS))
        return changed

    def admits(self, domain: str) -> Callable[[zmq.Frame], bool]:
        """For a server socket's pump: whether a message's sender still holds a key allowed
        on ``domain``. ZeroMQ checks a key once, at the handshake; asked of every message,
        this makes revoking a key end what its open connections can do at once, not when
        they close. The key is the message's ``User-Id`` (pyzmq's authenticator sets it to
        the z85 public key); a message without one is refused."""
        ring = self.ring

        def admit(frame: zmq.Frame) -> bool:
            try:
                key = frame.get("User-Id")
            except zmq.ZMQError:
                return False
            return isinstance(key, str) and ring.callback(domain, key.encode())

        return admit

    def stop(self) -> None:
        self._auth.stop()
