"""connguard: a client-side guard for MySQL/MariaDB connections."""

__version__ = "0.1.0"
