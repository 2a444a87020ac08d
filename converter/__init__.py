"""Turn a PyTorch transformer encoder into a fused, verified onnxruntime bundle.

Importing this package is cheap and pulls in neither torch nor onnxruntime: the service imports
``converter.bundle`` and ``converter.session`` without PyTorch.
"""
