"""Cython kernels of the transfer path (dirty tracking, dedup, page-stream codec)."""
