#!/bin/sh
# Fetch, here, the wheels that bench/gpu.py needs and a lent GPU machine's image lacks (it has torch, transformers,
# huggingface_hub and accelerate, and no network), av (the MP4 encode), pillow-heif, peft (the fast preset's LoRAs)
# and torchao (fp8) among them. They land in .whl/ (git-ignored); carry it to the machine and install it there as
# BENCHMARKS.md shows.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "${1:-.whl}" \
    diffusers==0.42.1 importlib-metadata==10.2.0 ftfy==6.3.1 wcwidth==0.9.4 \
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 av==18.1.0 pillow-heif==1.8.1 \
    peft==0.21.2 torchao==0.18.0
ls "${1:-.whl}"
