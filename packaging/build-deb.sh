#!/bin/bash
# Build the muxd .deb: packaging/build-deb.sh OUTDIR
#
# The Debian packaging lives in packaging/debian so that it does not clutter the
# top of the tree; dpkg-buildpackage wants debian/ at the top, so this copies the
# source (tracked and untracked-but-not-ignored files when this is a git work
# tree, else everything but .git, .venv and caches) into a temporary directory,
# puts debian/ there, builds, and moves the .deb into OUTDIR.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/muxd"
mkdir "$src"

if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            # a file deleted from the work tree but still in the index is gone
            if [ -e "$top/$f" ]; then printf '%s\0' "$f"; fi
        done |
        tar -C "$top" --null -T - -cf - | tar -C "$src" -xf -
else
    tar -C "$top" --exclude=.git --exclude=.venv --exclude=__pycache__ \
        --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache -cf - . |
        tar -C "$src" -xf -
fi
rm -rf "$src/debian"
cp -a "$top/packaging/debian" "$src/debian"

# pybuild runs "python3.X" from PATH: a pyenv or virtualenv python first on PATH
# would build for an interpreter the package will never run on.
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
mv "$work"/*.deb "$out"/
ls "$out"/*.deb
