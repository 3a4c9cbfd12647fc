"""Fault scenarios: crashes, restarts and outages, each on servers of its own (see harness)."""
