"""Exception types. Every error the package raises on purpose derives from :class:`MoEInterpError`."""

from __future__ import annotations


class MoEInterpError(Exception):
    """Base class of all moe_interp errors."""


class UnsupportedModelError(MoEInterpError, TypeError):
    """The model is not a Mixture-of-Experts model, or its architecture is not registered."""


class DataError(MoEInterpError, ValueError):
    """A data file, record or field is missing or malformed."""


class InputError(MoEInterpError, ValueError):
    """A prompt, span or argument given to a public function is invalid."""


class RecordingError(MoEInterpError, RuntimeError):
    """A hook expected to fire during the forward pass did not (the model was wrapped or patched)."""


def run_main(name: str, main) -> None:
    """Entry point of ``python -m <module>``: run ``main(argv)`` and report a package error (or a missing
    file) as one line on stderr with exit status 2, as the ``moe-interp`` command does; ``--traceback`` shows
    the Python traceback instead."""
    import sys

    argv = sys.argv[1:]
    show = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    try:
        result = main(argv)
    except (MoEInterpError, FileNotFoundError) as exc:
        if show:
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
