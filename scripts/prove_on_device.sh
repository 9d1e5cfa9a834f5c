#!/usr/bin/env bash
# Prove a lent GPU or Gaudi node in one command: `paca doctor` (every stage) on this machine's own torch, from this
# checkout, in under 8 minutes. Writes proof.json, proof.md and logs/ to $OUT (default runs/device-proof/).
#   bash scripts/prove_on_device.sh                 # the accelerator 'auto' finds (hpu, then cuda)
#   bash scripts/prove_on_device.sh --device cuda   # extra flags go to `paca doctor`
#   bash scripts/prove_on_device.sh --dry-run       # every stage on the CPU with tiny shapes (checks this script; measures nothing)
# * torch is never installed: the machine's own build runs. The package is imported from this checkout (PYTHONPATH).
# * Wheels prepared beforehand by scripts/device_wheels.sh ($PACA_WHEELS, default device-wheels/) are installed
#   into a temporary --target folder, offline, and put on PYTHONPATH after the checkout; none installed is not an error.
# * No stage starts after 420 s (the doctor's --deadline); the whole run is stopped at 480 s, and proof.json keeps
#   every stage finished before that.
# * $PACA_PROOF_COMMIT names the commit where the copy has no .git (a lent machine gets the working tree only).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-runs/device-proof}
WHEELS=${PACA_WHEELS:-device-wheels}
DEADLINE=${PACA_DEADLINE:-420}
HARD_LIMIT=${PACA_HARD_LIMIT:-480}
started=$(date +%s)

if [[ -z "${PACA_PROOF_COMMIT:-}" ]] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  PACA_PROOF_COMMIT=$(git -C "$ROOT" rev-parse HEAD)
  export PACA_PROOF_COMMIT
fi

extra_path=""
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  target=$(mktemp -d "${TMPDIR:-/tmp}/paca-wheels.XXXXXX")
  trap 'rm -rf "$target"' EXIT
  # --no-deps: the folder holds exactly what the machine lacks; torch is never among them.
  if "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$target" "$WHEELS"/*.whl; then
    extra_path=$target
    echo "prove_on_device: installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $target ($(( $(date +%s) - started )) s)"
  else
    echo "prove_on_device: installing the wheels from $WHEELS failed; the stages that need them will say so" >&2
  fi
fi
export PYTHONPATH="$ROOT${extra_path:+:$extra_path}${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

spent=$(( $(date +%s) - started ))
deadline=$(( DEADLINE - spent ))
limit=$(( HARD_LIMIT - spent ))
(( deadline < 30 )) && deadline=30
(( limit < deadline + 10 )) && limit=$(( deadline + 10 ))
timeout --signal=TERM --kill-after=15 "$limit" "$PY" -m paca_core doctor --out "$OUT" --overwrite --deadline "$deadline" --no-progress "$@"
status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "prove_on_device: stopped at the ${HARD_LIMIT} s limit; $OUT/proof.json holds every stage finished before it" >&2
fi
exit $status
