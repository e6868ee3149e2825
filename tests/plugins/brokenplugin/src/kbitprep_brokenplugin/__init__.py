"""Test fixture: two kbitprep backend plugins that must show as ``broken: ...``."""
