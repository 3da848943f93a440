"""Backend "triton" (issue 3 builds the kernels)."""


def load():
    return None, "the Triton kernels are not part of this build yet"
