"""The client: RemoteHive over the service's HTTP API."""

from hivemem.client.remote import RemoteHive

__all__ = ["RemoteHive"]
