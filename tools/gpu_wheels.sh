#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU host (Python 3.12, no network; it has JAX, flax,
# optax, orbax, numpy, pillow, absl-py, tqdm, protobuf, etils, PyTorch) lacks, for CPython 3.12
# manylinux x86_64 and without dependencies: the closure of requirements.txt's data and config
# packages minus what the host has. bench/gpu_check.sh installs them there.
#   tools/gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
# Versions as requirements.txt pins them (and as its install resolved the rest).
packages=(
  grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 ml-collections==1.1.0
  tensorboardX==2.6.5
  # what those need that the host lacks
  dm-tree==0.1.10 docstring-parser==0.18.0 googleapis-common-protos==1.76.0
  immutabledict==4.3.1 portpicker==1.6.0 simple-parsing==0.1.9
  tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
  # The host has protobuf, of a version not known here; tensorflow-metadata's generated code
  # refuses a runtime older than 6.33.5, so the pinned one comes along.
  protobuf==7.36.2
)
mkdir -p "$dest"
for p in "${packages[@]}"; do
  # pip matches a manylinux tag exactly: name the ones these projects publish.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform any -d "$dest" "$p"
done
# promise publishes no wheel; it is pure Python, so one built here installs anywhere.
python3 -m pip wheel -q --no-deps --no-binary=promise -w "$dest" promise==2.3
ls "$dest"
du -sh "$dest"
