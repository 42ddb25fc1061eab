#!/usr/bin/env bash
# One device command on the GPU box (after the reassemble commands of carry.md): provider check, tiny exports
# for cuda and tensorrt + verify, full-size random SD 1.5 export for cuda, then the runtime (IO binding, and
# CUDA graphs through a user profile with cuda_graph = true) against diffusers fp16 + SDPA at 512x512, 25 and
# 50 steps. Writes $OUT/results.json (rewritten after every stage: a timeout leaves partial results),
# $OUT/nvidia-smi.txt, $OUT/versions.json and one log per stage. Budget: about 8 minutes on an H200.
# --dry-run (or DRY_RUN=1): CPU provider, tiny model only, same JSON shape, on any machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY_RUN=${DRY_RUN:-0}; [[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT=${OUT:-bench/gpu/.box/out}; mkdir -p "$OUT"
WORK=${WORK:-bench/gpu/.box/work}; mkdir -p "$WORK"
export SDEXPORT_CACHE=${SDEXPORT_CACHE:-$PWD/bench/gpu/.box/cache}
PY=${PYTHON:-python3}; [[ -x .venv/bin/python && "$DRY_RUN" == 1 ]] && PY=.venv/bin/python
SITE=$PWD/bench/gpu/.box/site
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the onnxruntime-gpu wheel shadows the CPU build
# CUDA 13 / cuDNN 9 libraries of PyTorch's nvidia-* wheels, for the CUDA provider's dlopen
NV=$($PY -c "import glob,site,os;print(':'.join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s+'/nvidia/**/lib/*.so*',recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
RES=$OUT/results.json
if [[ "$DRY_RUN" == 1 ]]; then
    PROVIDER=cpu; DEVICE=cpu; TARGETS="cpu"; BASE_PROFILE=profiles/cpu.toml; SIZE=64; STEPS=2,3; RUNS=2; BIG=tiny
else
    PROVIDER=cuda; DEVICE=cuda; TARGETS="cuda tensorrt"; BASE_PROFILE=profiles/cuda.toml; SIZE=512; STEPS=25,50
    RUNS=3; BIG=sd15
fi
$PY - "$RES" "$DRY_RUN" <<'PYEOF'
import json, sys; json.dump({"dry_run": sys.argv[2] == "1", "stages": {}}, open(sys.argv[1], "w"), indent=2)
PYEOF
stage() {   # stage NAME SECONDS CMD...: run under timeout, log to $OUT/NAME.log, record rc/time in results.json
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
    $PY - "$RES" "$name" "$rc" "$t0" "$OUT/$name.log" <<'PYEOF'
import json, sys, time
res, name, rc, t0, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
data = json.load(open(res))
tail = open(log, errors="replace").read()[-1500:]
data["stages"][name] = {"rc": rc, "timed_out": rc in (124, 137), "seconds": round(time.time() - t0, 1), "log_tail": tail}
json.dump(data, open(res, "w"), indent=2)
PYEOF
    echo "stage $name: rc=$rc"
    return $rc
}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >>"$OUT/nvidia-smi.txt"
stage versions 60 $PY -c "
import json, sys, platform, importlib
v = {'python': sys.version, 'platform': platform.platform()}
for m in ['onnxruntime', 'torch', 'diffusers', 'transformers', 'onnx', 'numpy', 'tokenizers', 'safetensors', 'tensorrt']:
    try:
        mod = importlib.import_module(m); v[m] = getattr(mod, '__version__', '?') + ' @ ' + str(getattr(mod, '__file__', ''))
    except Exception as e:
        v[m] = 'missing: %s' % e
import torch; v['torch_cuda'] = torch.version.cuda; v['cuda_available'] = torch.cuda.is_available()
v['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
json.dump(v, open('$OUT/versions.json', 'w'), indent=2); print(json.dumps(v, indent=2))"
stage providers 60 $PY -c "
import json, onnxruntime as ort
p = ort.get_available_providers(); print(json.dumps(p))
want = ['CPUExecutionProvider'] if $DRY_RUN else ['CUDAExecutionProvider', 'TensorrtExecutionProvider']
missing = [w for w in want if w not in p]; print('missing:', missing); raise SystemExit(1 if missing else 0)"
# the CUDA-graph profile: the target's own profile with cuda_graph switched on (a --profile user file)
if grep -q '^cuda_graph *=' "$BASE_PROFILE"; then
    sed 's/^cuda_graph *= *false/cuda_graph = true/' "$BASE_PROFILE" >"$WORK/cuda_graph.toml"
else    # a top-level key must precede the first [table]
    { echo "cuda_graph = true"; cat "$BASE_PROFILE"; } >"$WORK/cuda_graph.toml"
fi
for t in $TARGETS; do
    stage "convert_tiny_$t" 240 $PY -m sdexport convert --model tiny --target "$t" --out "$WORK/tiny-$t" --force --quiet
    stage "verify_tiny_$t" 240 $PY -m sdexport verify "$WORK/tiny-$t" --model tiny
done
if [[ "$BIG" == sd15 ]]; then
    stage sd15_folder 180 $PY -c "from bench.models import sd15_folder; print(sd15_folder())"
    SRC=$($PY -c "from bench.models import sd15_folder; print(sd15_folder())" 2>/dev/null | tail -1)
else
    SRC=$($PY -c "from sdexport.tiny import tiny_folder; print(tiny_folder())" | tail -1)
fi
T0=${TARGETS%% *}
stage "convert_big_${T0}" 300 $PY -m sdexport convert --model "$SRC" --target "$T0" --out "$WORK/$BIG-$T0" --force --quiet
stage "convert_big_${T0}_cuda_graph" 300 $PY -m sdexport convert --model "$SRC" --profile "$WORK/cuda_graph.toml" \
    --out "$WORK/$BIG-$T0-graph" --force --quiet --no-verify
stage time 300 $PY bench/gpu/time_gpu.py --onnx "io_binding=$WORK/$BIG-$T0" --onnx "cuda_graph=$WORK/$BIG-$T0-graph" \
    --diffusers "$SRC" --provider "$PROVIDER" --device "$DEVICE" --size "$SIZE" --steps "$STEPS" --runs "$RUNS" \
    --out "$OUT/timings.json"
$PY - "$RES" "$OUT/timings.json" "$OUT/versions.json" <<'PYEOF'
import json, os, sys
data = json.load(open(sys.argv[1]))
for key, path in (("timings", sys.argv[2]), ("versions", sys.argv[3])):
    data[key] = json.load(open(path)) if os.path.exists(path) else None
json.dump(data, open(sys.argv[1], "w"), indent=2)
PYEOF
echo "results: $RES"
