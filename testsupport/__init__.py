"""What the test suite and the benchmarks share, in the repository only (not in the wheel):
:mod:`testsupport.servers`, throwaway MariaDB and Redis servers. The library never imports it."""
