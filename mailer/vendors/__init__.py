"""Vendor adapters behind one protocol (see base)."""
