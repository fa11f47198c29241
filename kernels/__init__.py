"""sdpo-fast's kernels, installed as `sdpo_fast.kernels` (see pyproject.toml's package-dir).

This folder sits at the repository root, so wherever a checkout's root is on `sys.path` (a REPL or notebook
started there, `python -c`, `python -m`) Python would find it as a top-level `kernels` first. That name belongs to
Hugging Face's `kernels` distribution, which transformers >= 5.25 requires and imports. Imported under that name,
this package steps aside: it takes itself out of `sys.modules`, imports the real `kernels` from the rest of
`sys.path` (or raises ModuleNotFoundError, exactly as if this folder were not there) and hands that module back
to the importer. Imported as `sdpo_fast.kernels` it does nothing.
"""

if __name__ == "kernels":
    import os as _os
    import sys as _sys

    def _step_aside():
        here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
        del _sys.modules["kernels"]
        saved = list(_sys.path)
        _sys.path[:] = [p for p in saved if _os.path.abspath(p or _os.curdir) != here]
        _sys.path_importer_cache.clear()  # the root's finder may have cached this folder as `kernels`
        try:
            import kernels as real  # Hugging Face's distribution, found without the checkout's root
        finally:
            _sys.path[:] = saved
            _sys.path_importer_cache.clear()
        _sys.modules["kernels"] = real  # what `import kernels` returns to its caller

    _step_aside()
