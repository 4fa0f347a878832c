"""The one compiled part of vb_batch: the codecs' kernels (vb_batch/codecs/_kernels.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C compiler),
the install goes on and the codecs decode with numpy, bit for bit the same (vb_batch/codecs/kernels.py).
-ffp-contract=off keeps every float32 multiply and add rounded on its own, as numpy rounds them.
"""

import sys

from setuptools import Extension, setup

# -O3 vectorises the element-wise loops (each lane computes what the scalar code would, no reductions);
# -fno-math-errno: sqrtf inlined as one instruction (the kernels never take the root of a negative number).
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]

setup(
    ext_modules=[
        Extension("vb_batch.codecs._kernels", ["vb_batch/codecs/_kernels.c"], extra_compile_args=FLAGS, optional=True)
    ]
)
