"""Adapters that put Braid's MoE layer into other training frameworks (optional dependencies)."""
