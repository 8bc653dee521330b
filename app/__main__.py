"""Entry point: ``python app -i DICOM_IN -o OUT [-m BUNDLE]`` (and what a MAP runs)."""

from __future__ import annotations

import gc
import sys

from app import main

if __name__ == "__main__":
    # The imports (torch, MONAI, highdicom, the SDK) leave ~0.8 M long-lived objects; every full collection during the
    # run would walk them all again (~0.3 s each on 2 cores, one or two per fraction). Frozen, collections skip them.
    gc.freeze()
    sys.exit(main(sys.argv))
