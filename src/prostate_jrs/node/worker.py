"""One job's processing, run by the node in a child process: ``python -m prostate_jrs.node.worker IN OUT BUNDLE``.

A child process isolates the pipeline: its memory is returned when it ends, and a hung run can be killed. Exit
status 0 when the five outputs are published in OUT, 1 with ``error: <reason>`` on stderr when the session cannot be
processed (nothing in OUT then).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from prostate_jrs.node.runner import ERROR_PREFIX

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Process one session folder; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m prostate_jrs.node.worker", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="session folder (planning CT, planning RTSTRUCT, daily CT of one patient)")
    parser.add_argument("output", help="output folder")
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--device", default=None, help="torch device (default: the app's)")
    args = parser.parse_args(argv)

    from prostate_jrs.dicom_session import SESSION_ERRORS, process_session  # after parsing: torch loads slowly

    try:
        summary = process_session(args.input, args.output, args.bundle, device=args.device)
    except SESSION_ERRORS as err:
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return 1
    for line in summary["summary"]:
        print(line, flush=True)
    print(f"timings (s): {json.dumps(summary['timings_s'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
