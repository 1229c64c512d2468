"""One place that turns expected failures into the one-line message + exit code the CLIs print."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .checkpoint import InputError
from .format import DeltaError

EXIT_BAD_INPUT = 2


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body; bad input ends with `prog: error: <what and where>` and exit 2, no traceback."""
    try:
        return body()
    except (InputError, DeltaError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
