"""prune2tvm's own TIR kernels (TVM 0.27 has no sparse operators), each with a numpy reference."""
