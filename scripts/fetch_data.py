"""Make Fashion-MNIST available for the shipped configs.

Order: files already present (Debian's /usr/share/datasets/fashion-mnist, or ./data) -> the Debian
package dataset-fashion-mnist when running as root with apt-get -> torchvision's download into ./data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from kd_lightning.datamodules import FashionMNIST


def present() -> bool:
    return FashionMNIST().available()


def main() -> None:
    if present():
        print("Fashion-MNIST: found.")
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("Fashion-MNIST: installing the Debian package dataset-fashion-mnist ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False, env=env)
        if present():
            print("Fashion-MNIST: installed from Debian.")
            return
    print("Fashion-MNIST: downloading with torchvision into ./data ...", flush=True)
    FashionMNIST(download=True).prepare()
    if not present():
        sys.exit("Fashion-MNIST: still missing after the download; see the messages above.")


if __name__ == "__main__":
    main()
