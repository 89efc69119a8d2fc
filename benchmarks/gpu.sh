#!/bin/bash
# One prepared accelerator run (the `device` tool's machine: Python 3.12 with its own jax/torch, no
# network). Carry `.whl` (diffusers 0.39.0, transformers 4.57.6, huggingface_hub 0.36.0, tokenizers
# 0.22.1 wheels: the image's transformers has no Flax classes). The tool returns at most 8 files of under ~8 MB
# from $OUT per call, so everything is written to /tmp/gpu_results and packed at the end into $OUT/results.tgz.?
# (7 MB parts, logs and tables first, model snapshots last); unpack with `cat results.tgz.? | tar xzf -`.
# The whole run stays within TOTAL_S (450) seconds, compiles included (the tool's limit is 8 minutes with the
# start): each stage runs under min(its budget, what is left); a budget of 0 skips it.
# Env: BATCH (8,32), VARIANTS (two_applies,two_applies:cudnn), FLAG_SETS (XLA flag sets of
#   bench_sampling.py, e.g. gpu_autotune_0,gpu_no_triton_gemm; none by default), STEPS (5), ROUNDS (3),
#   PROFILE (1: XLA trace of the first variant and torch.profiler of the loop, as kernel tables),
#   SAMPLING_S (300), FINETUNE_S (0), TESTBED_S (the rest), CURVE_S (0). XLA_FLAGS passes through to every row.
#   (2026-12-04: 170 s did not get the SD 1.x rows at batch 32 with two variants past building and compiling:
#   give the sampling stage 300 s or more.)
# SDXL (optional, off by default so the budget above is unchanged): SDXL_S seconds for the SDXL base UNet
#   (2.6B, random weights) at 128x128x4 latents in bfloat16, ours (SDXL_VARIANTS: two_applies) vs diffusers
#   PyTorch, batch SDXL_BATCH (4); building and loading its 10 GB of weights and compiling it take minutes, so
#   give it most of the run:
#   SDXL_S=420 SAMPLING_S=0 TESTBED_S=0 bash benchmarks/gpu.sh
# Issue 12 in two runs: train the testbed base (`SAMPLING_S=0 bash benchmarks/gpu.sh`; TESTBED_INIT=DIR
# continues from a trained pipeline, e.g. the committed finextract_jax/testbed/base_model), commit it
# there, then its curve (`SAMPLING_S=0 TESTBED_S=0 CURVE_S=430 bash benchmarks/gpu.sh`). The curve
# clusters with numba: add numba and llvmlite wheels for the machine's Python (3.12) to .whl if its image lacks
# them (`pip download --only-binary=:all: --python-version 3.12 "numba>=0.61,<0.70" -d .whl`, as setup.py pins it).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FINEXTRACT_CACHE= XLA_PYTHON_CLIENT_MEM_FRACTION=.9
DEVICE_OUT=${OUT:-/tmp/out}; OUT=/tmp/gpu_results; rm -rf $OUT; mkdir -p $OUT $DEVICE_OUT
TOTAL_S=${TOTAL_S:-450}
budget() { local left=$((TOTAL_S - SECONDS)); echo $(( $1 < left ? $1 : left )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/versions.txt
python3 - <<'PY' 2>&1 | grep -v Warning | tee -a $OUT/versions.txt
import jax, jaxlib, flax, torch, diffusers, transformers
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "cuda", torch.version.cuda, "cudnn (torch)", torch.backends.cudnn.version(), "diffusers", diffusers.__version__,
      "transformers", transformers.__version__)
print("devices", jax.devices(), "XLA_FLAGS", repr(__import__("os").environ.get("XLA_FLAGS", "")))
PY
S=$(budget ${SAMPLING_S:-300})
if [ "$S" -gt 30 ]; then
    timeout $S python3 benchmarks/bench_sampling.py --size=sd1 --dtype=bfloat16 --batch=${BATCH:-8,32} --mfu --torch \
        --steps=${STEPS:-5} --rounds=${ROUNDS:-3} --variants=${VARIANTS:-two_applies,two_applies:cudnn} \
        --flag_sets=${FLAG_SETS:-} $([ "${PROFILE:-1}" = 1 ] && echo --profile=/tmp/profile) \
        2>&1 | grep -v -E "Warning|USDT" | tee $OUT/sampling.txt
fi
S=$(budget ${SDXL_S:-0})
if [ "$S" -gt 30 ]; then
    timeout $S python3 benchmarks/bench_sampling.py --size=sdxl --dtype=bfloat16 --batch=${SDXL_BATCH:-4} --mfu \
        --torch --steps=3 --rounds=2 --variants=${SDXL_VARIANTS:-two_applies} \
        2>&1 | grep -v -E "Warning|USDT" | tee $OUT/sampling_sdxl.txt
fi
S=$(budget ${FINETUNE_S:-0})
if [ "$S" -gt 30 ]; then
    timeout $S python3 benchmarks/bench_finetune.py --size=sd1 --dtypes=bfloat16 --methods=lora,dreambooth \
        --steps=10 2>&1 | grep -v Warning | tee $OUT/finetune.txt
fi
# The testbed base (finextract_jax/testbed/, README "The testbed"): trained from scratch, 20,000 steps of 32
# images, in at most TESTBED_S seconds (default: what is left; run with SAMPLING_S=0 to give it the whole
# budget). This machine has no npm: carry testbed_work/testbed_data.npz
# (written by `python -m experiments.testbed_base --data=testbed_work/testbed_data.npz`). TESTBED_INIT=DIR
# starts from that pipeline's weights instead of random ones (seed 1, fresh optimizer).
# TESTBED_RUNS="NAME:FLAGS;NAME:FLAGS" trains several bases side by side on the one chip instead (each with an
# equal share of its memory; FLAGS: testbed_base flags), e.g.
#   TESTBED_RUNS="medium:--size=medium --caption_dropout=0.2;small:--init=finextract_jax/testbed/base_model --seed=1"
# Each run's last snapshot comes back in $OUT/testbed_NAME (the default run's NAME is "base"), also when the time
# runs out, with its log in $OUT/testbed_NAME.txt and, unless PROBE_S=0, its probe grid and retrieval numbers
# (testbed_samples) in $OUT/testbed_NAME_probe.png / .txt, the probes sharing the last PROBE_S (110) seconds.
S=$(budget ${TESTBED_S:-$TOTAL_S})
PROBE_S=${PROBE_S:-110}
if [ -f testbed_work/testbed_data.npz ] && [ "$S" -gt $((PROBE_S + 60)) ]; then
    IFS=';' read -ra runs <<< "${TESTBED_RUNS:-base:$([ -n "${TESTBED_INIT:-}" ] && echo --init=$TESTBED_INIT --seed=1)}"
    share=$(python3 -c "print(round(.9 / ${#runs[@]}, 3))")
    for run in "${runs[@]}"; do
        name=${run%%:*}
        XLA_PYTHON_CLIENT_MEM_FRACTION=$share timeout $((S - PROBE_S - 10)) python3 -m experiments.testbed_base \
            --workdir=/tmp/testbed_$name --data=testbed_work/testbed_data.npz --out=$OUT/testbed_$name \
            --export_every=1000 --checkpoint_every=2500 ${run#*:} \
            2>&1 | grep -v Warning | grep -v "^W" | tail -n 60 > $OUT/testbed_$name.txt &
    done
    wait
    for run in "${runs[@]}"; do
        name=${run%%:*}; tail -n 3 $OUT/testbed_$name.txt
        [ -d $OUT/testbed_$name ] || cp -r /tmp/testbed_$name/snapshot $OUT/testbed_$name
        [ "$PROBE_S" -gt 0 ] && XLA_PYTHON_CLIENT_MEM_FRACTION=$share timeout $PROBE_S python3 -m experiments.testbed_samples \
            --model=$OUT/testbed_$name --data=testbed_work/testbed_data.npz --out=$OUT/testbed_${name}_probe.png \
            2>&1 | grep -E "eps-MSE|v-MSE|retrieval|wrote" > $OUT/testbed_${name}_probe.txt &
    done
    wait
    tail -n 20 $OUT/testbed_*_probe.txt
fi
# The fine-tuning-strength curve (issue 12; README "The testbed") on a trained base: CURVE_BASE (default: the
# base this run just trained, else the committed finextract_jax/testbed/base_model), for CURVE_S seconds (0: skip). Carry
# testbed_work/testbed_data.npz and testbed_work/style_data.npz (built where npm works:
# `python -m experiments.testbed_curve ... --style_data=testbed_work/style_data.npz`). Runs go seed by seed
# and the tables are rewritten after each, so a run cut short returns whole curves for its first seeds;
# CURVE_FLAGS adds testbed_curve flags (e.g. --seeds=0 --sets=object). Results in $OUT/curve/.
S=$(budget ${CURVE_S:-0})
base=${CURVE_BASE:-$([ -d $OUT/testbed_base ] && echo $OUT/testbed_base || echo finextract_jax/testbed/base_model)}
if [ "$S" -gt 60 ] && [ -d "$base" ]; then
    timeout $((S - 10)) python3 -m experiments.testbed_curve --pretrained=$base --workdir=/tmp/curve \
        --data=testbed_work/testbed_data.npz --style_data=testbed_work/style_data.npz ${CURVE_FLAGS:-} \
        2>&1 | grep -v Warning | grep -v "^W" | tail -n 40 | tee $OUT/curve.txt
    mkdir -p $OUT/curve && cp /tmp/curve/*.md /tmp/curve/*.csv /tmp/curve/*.png $OUT/curve/ 2>/dev/null
fi
echo "gpu.sh: ${SECONDS}s of TOTAL_S=${TOTAL_S}"
(cd $OUT && tar czf - $(ls -d *.txt *.png curve 2>/dev/null) $(ls -d testbed_* 2>/dev/null | grep -v -E "\.(txt|png)$")) \
    | split -b 7M -a 1 - $DEVICE_OUT/results.tgz.
ls -la $DEVICE_OUT
