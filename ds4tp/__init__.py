"""ds4tp: DeepSeek V4 Flash, tensor-parallel over two nodes."""
__version__ = "0.1.0"
