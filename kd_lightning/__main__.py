"""``python -m kd_lightning ...``: the ``kd`` command (:func:`kd_lightning.cli.console`)."""

from kd_lightning.cli import console

if __name__ == "__main__":
    console()
