"""``python -m kd_lightning ...``: the ``kd`` command (:func:`kd_lightning.cli.console`)."""

import sys

from kd_lightning.cli import console

if __name__ == "__main__":
    sys.argv[0] = "kd"  # the program's name in usage lines and messages, not "__main__.py"
    console()
