"""Shared fixtures live in the harness plugin ``tests/mariadb.py`` (loaded with ``-p``)."""

from tests.peers import veth  # noqa: E402, F401 - the veth-pair fixture, for every test module
