"""Print the dependencies of a pyproject.toml, one a line, less the ones named after --without.

Used by docker/install.sh for the GPU image: the NGC container has its own tritonserver, so the wheel
that ships one (nvidia-pytriton) is left out.

    python3 docker/requirements.py pyproject.toml --without nvidia-pytriton
"""

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (NGC 24.10)
    tomllib = None


def dependencies(text: str) -> list:
    if tomllib is not None:
        return tomllib.loads(text)["project"]["dependencies"]
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def main(argv: list) -> int:
    path, without = argv[0], set()
    if "--without" in argv:
        without = {name.lower() for name in argv[argv.index("--without") + 1:]}
    with open(path, encoding="utf-8") as f:
        deps = dependencies(f.read())
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
        if name not in without:
            print(dep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
