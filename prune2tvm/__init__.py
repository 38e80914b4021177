"""prune2tvm: prune PyTorch models, compile them with Apache TVM, and measure what sparsity buys.

Importing the package is cheap on purpose: torch, onnxruntime and tvm are imported only
by the stage that needs them (tvm only inside ``prune2tvm.compile``).
"""

__version__ = "0.1.0"
