#!/bin/sh
# The install step of both images, also run by tests/test_images_build.py in a fresh venv so a
# broken image build is a failing test even where no container engine runs.
#
#   install-venv.sh VENV LOCKFILE WHEEL
#
# Creates VENV without pip, installs exactly the pins of LOCKFILE (no resolver, no extra
# packages: --no-deps) and then the pgwarden WHEEL, also with --no-deps.
set -eu
venv=$1 lock=$2 wheel=$3
python3 -m venv --without-pip "$venv"
python3 -m pip --python "$venv/bin/python" install --no-cache-dir --no-deps --only-binary=:all: -r "$lock"
python3 -m pip --python "$venv/bin/python" install --no-cache-dir --no-deps "$wheel"
