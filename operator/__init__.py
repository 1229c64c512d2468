"""The deltafleet Kubernetes operator (kopf). Imported as `deltafleet.operator`; never imports torch."""

if __name__ == "operator":  # pragma: no cover - only when a checkout's root is on sys.path
    # `python -c …` or `python -m …` run from the repo root puts the root first on sys.path,
    # and this folder then shadows the stdlib module that `collections` imports at start-up.
    # Become the stdlib module instead of breaking the interpreter.
    import sys as _sys

    _stdlib = _sys.modules["os"].__file__.rsplit("/", 1)[0] + "/operator.py"
    with open(_stdlib) as _f:
        exec(compile(_f.read(), _stdlib, "exec"))
