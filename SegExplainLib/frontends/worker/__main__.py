"""``python -m SegExplainLib.frontends.worker``: the worker's child, serving requests on its standard streams."""

from .serving import main

if __name__ == "__main__":  # pragma: no cover - the child process
    main()
