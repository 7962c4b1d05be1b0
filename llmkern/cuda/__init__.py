"""Host launchers of the CUDA kernels in csrc/cuda: each llmkern/cuda/<op>.py turns torch
tensors into the pointers, sizes, strides and stream that llmkern._cuda takes."""
