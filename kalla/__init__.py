"""Kalla: a reconciliation engine."""
__version__ = "0.1.0"
