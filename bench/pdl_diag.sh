set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD DS4TP_GOLDEN=$PWD/.golden
echo "== PDL on: linear_normed cases, CUDA C twins"
timeout 120 python3 -m pytest -x -q tests/test_kernels.py -k "linear_normed or cuda_c_kernels" 2>&1 | tail -3
echo "== PDL off: linear_normed cases"
timeout 120 python3 -c "
from ds4tp.kernels import pdl; pdl.set_enabled(False)
import pytest, sys; sys.exit(pytest.main(['-x','-q','tests/test_kernels.py','-k','linear_normed']))" 2>&1 | tail -4
echo "== PDL bit-identity (4 full-width layers)"
timeout 150 python3 -m pytest -x -q tests/test_decode_graph.py -k "pdl" 2>&1 | tail -15
echo "== bench"
timeout 200 python3 -m ds4tp bench --tp 1 --depth 0 --out $OUT/bench.json 2>&1 | grep '^{' | cut -c1-300
python3 -c "import json; r=json.load(open('$OUT/bench.json'))['runs']['tp1']; [print(k, round(v['tok_s'], 1)) for k, v in r.items() if isinstance(v, dict) and 'tok_s' in v]; print(r.get('profile'))"
