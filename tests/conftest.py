import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined, so
# this must happen before vssm.kernels imports its Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # the CUDA tests compare with float32/float64 references: no TF32 in matmuls and convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
