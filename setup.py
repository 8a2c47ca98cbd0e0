"""Maps the top-level folders onto the ``largebatch`` namespace (pyproject.toml holds the rest)."""

from setuptools import find_packages, setup

FOLDERS = {"client": "client", "service": "service", "scaling_rules": "scaling_rules"}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    packages.append(f"largebatch.{name}")
    package_dir[f"largebatch.{name}"] = folder
    for sub in find_packages(folder):
        packages.append(f"largebatch.{name}.{sub}")
        package_dir[f"largebatch.{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# The recipe explorer's page and scripts (served at /) are files, not modules: ship them explicitly.
package_data = {"largebatch.service": ["static/*", "static/*/*"], "largebatch.client.optim": ["*.c"],
                "largebatch.scaling_rules": ["corpus.csv"]}

setup(packages=packages, package_dir=package_dir, package_data=package_data)
