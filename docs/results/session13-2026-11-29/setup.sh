# device setup: wheels the image lacks, work dir
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD W=/tmp/work
mkdir -p $W
nvidia-smi -L; python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"; nproc; git log -1 --format=%h 2>/dev/null
python3 -c "from bench.common import source_digest; print('source', source_digest())"
