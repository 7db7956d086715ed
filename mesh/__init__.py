"""meshserve's runtime and wire: actors, ZeroMQ transport, codec, messages, errors, client."""

from mesh.client import Client
from mesh.errors import MeshError

__all__ = ["Client", "MeshError"]
