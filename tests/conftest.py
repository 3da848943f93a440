import os
import sys

# Run the Triton kernels in Triton's interpreter (on CPU tensors) unless told otherwise; must be set before
# triton is first imported. Only the "triton" backend reads it. On a GPU, run with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
