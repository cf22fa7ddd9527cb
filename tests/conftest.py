"""Shared fixtures live in the harness plugin ``tests/mariadb.py`` (loaded with ``-p``)."""
