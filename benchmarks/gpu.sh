#!/bin/bash
# One prepared accelerator run (the `device` tool's machine: Python 3.12 with its own jax/torch, no
# network). Carry `.whl` (diffusers 0.39.0, transformers 4.57.6, huggingface_hub 0.36.0, tokenizers
# 0.22.1 wheels: the image's transformers has no Flax classes). Logs land in $OUT.
# Env: BATCH (8), VARIANTS (two_applies,lora_batch), SAMPLING_S, FINETUNE_S (per-benchmark time limits).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FINEXTRACT_CACHE= XLA_PYTHON_CLIENT_MEM_FRACTION=.9
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a $OUT/gpu.txt
timeout ${SAMPLING_S:-300} python3 benchmarks/bench_sampling.py --size=sd1 --dtype=bfloat16 --batch=8 --mfu --torch \
    --variants=${VARIANTS:-two_applies,lora_batch} 2>&1 | grep -v Warning | tee $OUT/sampling.txt
timeout ${FINETUNE_S:-200} python3 benchmarks/bench_finetune.py --size=sd1 --dtypes=bfloat16 --methods=lora,dreambooth \
    --steps=10 2>&1 | grep -v Warning | tee $OUT/finetune.txt
# The testbed base (finextract_jax/testbed/, README "The testbed"): trained from scratch, 20,000 steps of 32
# images, in at most TESTBED_S (480) seconds. This machine has no npm: carry testbed_work/testbed_data.npz
# (written by `python -m experiments.testbed_base --data=testbed_work/testbed_data.npz`). The last snapshot
# and its probe grid come back in $OUT/testbed_base and $OUT/testbed_probe.png, also when the time runs out.
if [ -f testbed_work/testbed_data.npz ]; then
    timeout ${TESTBED_S:-480} python3 -m experiments.testbed_base --workdir=/tmp/testbed \
        --data=testbed_work/testbed_data.npz --out=$OUT/testbed_base --export_every=2500 --checkpoint_every=2500 \
        2>&1 | grep -v Warning | grep -v "^W" | tail -n 60 | tee $OUT/testbed.txt
    [ -d $OUT/testbed_base ] || cp -r /tmp/testbed/snapshot $OUT/testbed_base
    python3 -m experiments.testbed_samples --model=$OUT/testbed_base --data=testbed_work/testbed_data.npz \
        --out=$OUT/testbed_probe.png 2>&1 | tail -n 3
fi
