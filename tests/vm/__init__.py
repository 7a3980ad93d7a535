"""A VM with a real Linux kernel (with the WireGuard module) for tests: see harness.py and setup.sh."""
