"""methods/ and datasets/ sit at the top of the repository (the design card's layout) but are installed
only under the project namespace, as ``fdsbench.methods`` and ``fdsbench.datasets``: a bare top-level
``datasets`` package would shadow the Hugging Face one."""
from setuptools import find_packages, setup

MAPPED = {"fdsbench": "fdsbench", "fdsbench.methods": "methods", "fdsbench.datasets": "datasets"}


def _packages():
    found = []
    for name, folder in MAPPED.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages(), package_dir=MAPPED)
