#!/usr/bin/env bash
# On the GPU box, one device command per carry set (see carry.md): move the carried chunks into the
# persistent store bench/gpu/.box/ (ignored, so it survives between commands while the box stays up),
# rebuild and SHA-256-check every file whose chunks are all there, and pip-install complete wheels with
# --no-deps into bench/gpu/.box/site (run.sh puts it first on PYTHONPATH). Exit 0: everything complete
# and installed; 3: chunks still to come (normal until the last set); 2: a checksum failed (carry that set again).
set -uo pipefail
cd "$(dirname "$0")/../.."
STORE=bench/gpu/.box; SITE=$STORE/site; OUT=${OUT:-$STORE/out}
mkdir -p "$STORE" "$SITE" "$OUT"
python3 bench/gpu/chunks.py assemble bench/gpu/payload "$STORE" | tee "$OUT/reassemble.json"
rc=${PIPESTATUS[0]}
[[ $rc == 2 ]] && exit 2
for whl in "$STORE"/files/*.whl; do
    [[ -f "$whl" ]] || continue
    mark="$STORE/installed-$(basename "$whl")"
    [[ -f "$mark" ]] && continue
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "dry run: would install $whl"; touch "$mark"; continue; fi
    python3 -m pip install --no-deps --no-index --target "$SITE" "$whl" >"$OUT/pip-$(basename "$whl").log" 2>&1 \
        && touch "$mark" || { echo "pip install failed: $whl (see pip log)"; exit 4; }
done
ls "$STORE"/installed-* 2>/dev/null
exit $rc
