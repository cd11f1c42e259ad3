#!/usr/bin/env bash
# Run HERE, before a device call: puts into .whl/ (git-ignored through .git/info/exclude)
# what the GPU machine lacks for benchmarks/gpu/suite.sh: optuna and its dependencies for
# its Python 3.12, and mpqc itself as a wheel built from this checkout. Needs the package
# registry (pip download), not a GPU. About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "optuna==5.0.0" "alembic==1.20.1" "sqlalchemy==2.1.9" "colorlog==6.12.0" "mako==1.4.3" "greenlet==3.5.6"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls -la .whl
