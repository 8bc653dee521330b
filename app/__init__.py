"""prostate-jrs MONAI Deploy application (see README.md).

As in the SDK's example apps, this folder puts itself on ``sys.path`` so that ``app`` and ``operators`` import the
same way whether it runs as ``python app``, inside a MAP (``/opt/holoscan/app``) or is imported by tests.
"""

import os
import sys

_current_dir = os.path.abspath(os.path.dirname(__file__))
if sys.path and os.path.abspath(sys.path[0]) != _current_dir:
    sys.path.insert(0, _current_dir)
del _current_dir
