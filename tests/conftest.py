"""Shared pytest fixtures: network namespaces for the end-to-end tests."""

from tests.netns import netns_factory, two_hosts

__all__ = ["netns_factory", "two_hosts"]
