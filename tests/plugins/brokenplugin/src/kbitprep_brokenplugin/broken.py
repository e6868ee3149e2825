"""Raises on import, as a plugin whose own dependency is missing does."""

from __future__ import annotations

raise ImportError("kbitprep_brokenplugin needs the library 'not_a_real_quant_lib', which is not installed")
