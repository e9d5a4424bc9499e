#!/usr/bin/env bash
# The overlay PNGs in docs/ (README, docs/GROUNDING.md): one relevance map per modality from the
# shipped demo model. Prints each explanation's JSON less its map, to check the peak by eye.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
medlava synth --out "$tmp/w777" --n 1 --seed 777 >/dev/null   # study 0 of the held-out world: a CT lung nodule
explain() {
    medlava explain "$1" "$2" --out "docs/$3" --method relevance --json \
        | python3 -c 'import json, sys; e = json.load(sys.stdin); e.pop("map"); print(json.dumps(e))'
}
explain samples/phantom_chest_effusion.dcm "Is there a pleural effusion?" explain_xray.png
explain "$tmp/w777/images/syn-777-00000.dcm" "Is there a lung nodule?" explain_ct.png
explain samples/phantom_brain_mass.nii.gz "Is there a brain mass?" explain_mri.png
