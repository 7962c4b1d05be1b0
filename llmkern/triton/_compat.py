"""Differences between the Triton versions llmkern supports (3.6 to 3.9) that its kernels would
otherwise meet. Applied once, when llmkern.triton is imported.

- The CPU interpreter of Triton 3.6 turns a scalar tensor into a Python int (a loop bound:
  `for start in range(0, n_cols, BLOCK)` with a run-time n_cols) by `int(data)` on a 1-element
  1-D numpy array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
  scalars"): every kernel with such a loop fails there. Triton fixed it upstream (issue 9171;
  3.8 and 3.9 squeeze the array first); with an older interpreter, llmkern makes the same change.
  Compiled (GPU) kernels never take this path.
"""

from __future__ import annotations

import os


def _interpreter_index_is_broken() -> bool:
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True  # this NumPy refuses what Triton 3.6's interpreter does
    return False


def patch_interpreter() -> None:
    """Make the interpreter's tensor.__index__ take a 1-element array (Triton 3.6 with NumPy >= 2.4)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not _interpreter_index_is_broken():
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8):
        return  # fixed upstream
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_llmkern_index_fix", False):
        return

    def _index(self):
        return int(self.handle.data.squeeze())  # what Triton >= 3.8 does

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor._llmkern_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
