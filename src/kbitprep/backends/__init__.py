"""Built-in backend strategies, one module per quantization method.

Each module imports its quantization library only inside methods, when a model is being detected
or prepared, so ``import kbitprep.backends.<name>`` stays as cheap as ``import torch``.
"""
