"""Runners that execute database drivers' own test suites with connguard in the loop."""
