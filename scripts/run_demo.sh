#!/usr/bin/env bash
# The main job on the shipped defaults: render the demo catalog's mock lenses, inspect one and,
# where ../shared is present, a real HST lens; then sample the posterior of a Euclid-like mock
# with the shipped (provisional, CPU-trained) euclid model.
source "$(dirname "$0")/_env.sh" plots
OUT="${1:-$ROOT/lensflow-demo}"
lensflow simulate catalogs/demo_params.ecsv --out "$OUT/mocks" --preset hst --seed 42
lensflow inspect "$OUT/mocks/demo_ring.fits" --out "$OUT/demo_ring.png"
REAL="$ROOT/../shared/data/real_lenses/SDSSJ2303+1422"
if [ -d "$REAL" ]; then
    lensflow inspect "$REAL/image.fits" --noise "$REAL/noise_map.fits" --psf "$REAL/psf.fits" \
        --pixel-scale 0.05 --out "$OUT/SDSSJ2303+1422.png"
fi
lensflow simulate catalogs/demo_params.ecsv --out "$OUT/mocks_euclid" --preset euclid --seed 42
lensflow sample "$OUT/mocks_euclid/demo_ring.fits" --model euclid -n 1000 --seed 0 \
    --out "$OUT/posterior_demo_ring"
python - "$OUT" <<'PY'
import sys
from astropy.table import Table
out = sys.argv[1]
truth = Table.read(f"{out}/mocks_euclid/truth.ecsv")
summary = Table.read(f"{out}/posterior_demo_ring/summary.ecsv")
t = truth[truth["id"] == "demo_ring"][0]["lens_theta_e"]
s = summary[0]
print(f"demo_ring theta_E: posterior {s['lens_theta_e_median']:.3f} "
      f"[{s['lens_theta_e_p16']:.3f}, {s['lens_theta_e_p84']:.3f}] arcsec, truth {t:.3f}")
PY
echo
echo "Done. Mock cutouts and truth tables: $OUT/mocks*/   figures: $OUT/*.png"
echo "Posterior samples and summary of demo_ring: $OUT/posterior_demo_ring/"
