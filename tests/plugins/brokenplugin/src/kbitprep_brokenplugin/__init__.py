"""Test fixture: kbitprep backend plugins that must show as ``broken: ...``."""
