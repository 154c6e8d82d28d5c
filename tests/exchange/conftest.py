"""Make this folder importable, so the example plug-in resolves as `braid_plugin_example:...`
(spawned ranks inherit sys.path from the parent)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
