#!/usr/bin/env bash
# The whole test suite: the fast tests, then the slow ones (minutes each or big models), then
# the vLLM tests in .venv-vllm (skipped with a notice when it was not set up).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0
run() {
    echo "=== $*"
    "$@"
    rc=$?
    # pytest exits 5 when no test matched: nothing to run is not a failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed=1; fi
}
run python -m pytest
run python -m pytest -m "slow and not vllm"
if [ -x .venv-vllm/bin/python ]; then
    run .venv-vllm/bin/python -m pytest -m "vllm and not gpu"
else
    echo "=== .venv-vllm not set up (SWARMRL_SKIP_VLLM=1?): the vLLM tests were not run"
fi
exit "$failed"
