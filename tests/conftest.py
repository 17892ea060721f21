import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined, so
# this must happen before vssm.kernels imports its Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
