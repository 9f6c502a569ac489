#!/usr/bin/env bash
# On the lent GPU machine (no network): vLLM 0.26.0 from the carried wheels (../shared/device
# recipe), then this project, so vLLM finds its plugins (entry points) in every process.
# Usage, from the project root there:  source bench/gpu_setup.sh
# GENARM_VLLM_SITE=/tmp/site33: vLLM 0.33 instead, staged by bench/stage_newest_vllm.sh's calls.
site=${GENARM_VLLM_SITE:-/tmp/site}
[ "$site" != /tmp/site ] || [ -d /tmp/site/vllm ] || bash .vdeps/install.sh >/dev/null
export PYTHONPATH=$site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "warning: editable install failed; vLLM will not see the genarm plugins" >&2
python3 -c "import importlib.metadata as m; print('plugins:', [e.name for e in m.entry_points(group='vllm.general_plugins')])"
