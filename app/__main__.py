"""Entry point: ``python app -i DICOM_IN -o OUT [-m BUNDLE]`` (and what a MAP runs)."""

from __future__ import annotations

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
