#!/usr/bin/env bash
# The main job on the shipped defaults: render the demo catalog's mock lenses with the hst
# preset, inspect one of them and, where ../shared is present, a real HST lens.
source "$(dirname "$0")/_env.sh" plots
OUT="${1:-$ROOT/lensflow-demo}"
lensflow simulate catalogs/demo_params.ecsv --out "$OUT/mocks" --preset hst --seed 42
lensflow inspect "$OUT/mocks/demo_ring.fits" --out "$OUT/demo_ring.png"
REAL="$ROOT/../shared/data/real_lenses/SDSSJ2303+1422"
if [ -d "$REAL" ]; then
    lensflow inspect "$REAL/image.fits" --noise "$REAL/noise_map.fits" --psf "$REAL/psf.fits" \
        --pixel-scale 0.05 --out "$OUT/SDSSJ2303+1422.png"
fi
echo
echo "Done. Mock cutouts and truth table: $OUT/mocks/   figures: $OUT/*.png"
