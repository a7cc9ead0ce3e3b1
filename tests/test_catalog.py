"""Catalog analysis: reading and validation, failed rows, resumability after kill -9, Dask.

The runs use the committed demo catalog (catalogs/demo.ecsv: 64x64 px Euclid-like cutouts)
with 50 samples per lens and no figures, so each lens takes well under a second on a CPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from lensflow.catalog import lens_seed, read_catalog, run_catalog
from lensflow.cli import main
from lensflow.params import NAMES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "catalogs" / "demo.ecsv"
DEMO_TRUTH = ROOT / "catalogs" / "demo_truth.ecsv"
SUFFIXES = ("median", "p16", "p84", "p2p5", "p97p5")
SUMMARY = [f"{p}_{s}" for p in NAMES for s in SUFFIXES]
#: Same machine, same thread count and the same batched calls: the runs should agree bit for
#: bit. The tolerance only absorbs a printing round trip (ECSV writes floats with repr).
RTOL = 1e-5


def _demo_rows(tmp_path: Path, ids: list[str], name: str = "cat.ecsv") -> Path:
    """A catalog of some demo rows, beside copies of their FITS files."""
    demo = Table.read(DEMO)
    (tmp_path / "demo").mkdir(exist_ok=True)
    keep = demo[[i for i, x in enumerate(demo["id"]) if x in ids]]
    for f in keep["image"]:
        shutil.copy(DEMO.parent / f, tmp_path / f)
    path = tmp_path / name
    keep.write(path, overwrite=True)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _assert_same_summaries(a: Table, b: Table) -> None:
    assert list(a["id"]) == list(b["id"])
    assert list(a["status"]) == list(b["status"])
    for name in SUMMARY:
        np.testing.assert_allclose(
            np.asarray(a[name]), np.asarray(b[name]), rtol=RTOL, err_msg=name
        )


# --- reading -------------------------------------------------------------------------------


def test_read_catalog_converts_units_and_resolves(tmp_path):
    path = tmp_path / "c.ecsv"
    t = Table({"id": ["a", "b"], "image": ["a.fits", "b.fits"], "pixel_scale": [100.0, 50.0]})
    t["pixel_scale"].unit = u.mas
    t["extra"] = [1, 2]
    t.write(path)
    cat = read_catalog(path)
    np.testing.assert_allclose(cat["pixel_scale"], [0.1, 0.05])
    assert cat["pixel_scale"].unit == u.arcsec
    assert list(cat["extra"]) == [1, 2]  # unknown columns are carried through
    assert cat.meta["catalog_path"] == str(path.resolve())
    csv = tmp_path / "c.csv"
    csv.write_text("id,image,ra,dec\nx,x.fits,150.1,2.2\n")
    cat = read_catalog(csv)
    assert cat["ra"].unit == u.deg and float(cat["dec"][0]) == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("id,psf\na,p.fits\n", "missing required column(s) image"),
        ("id,image\na,a.fits\na,b.fits\n", "rows 0 and 1 have the same id 'a'"),
        ("id,image\na/b,a.fits\n", "row 0: id 'a/b' is not usable"),
        ("id,image,preset\na,a.fits,jwst\n", "row 0 (id a): unknown preset 'jwst'"),
        ("id,image,status\na,a.fits,x\n", "column(s) status are reserved"),
        ("id,image,pixel_scale\na,a.fits,big\n", "column pixel_scale is not numeric"),
        ("id,image\n", "the catalog has no rows"),
    ],
)
def test_read_catalog_errors_name_the_problem(tmp_path, rows, message):
    path = tmp_path / "c.csv"
    path.write_text(rows)
    with pytest.raises(ValueError, match="c.csv") as err:
        read_catalog(path)
    assert message in str(err.value)


def test_read_catalog_unreadable_and_missing(tmp_path):
    bad = tmp_path / "c.fits"
    bad.write_bytes(b"not a fits file at all")
    with pytest.raises(ValueError, match="cannot read as a table"):
        read_catalog(bad)
    with pytest.raises(ValueError, match="catalog not found"):
        read_catalog(tmp_path / "nope.ecsv")


def test_cli_catalog_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.csv"
    path.write_text("id,image,preset\na,a.fits,jwst\n")
    assert main(["catalog", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lensflow: error: ") and err.count("\n") == 1 and "jwst" in err


def test_lens_seed_depends_on_seed_and_id_only():
    assert lens_seed(0, "a") == lens_seed(0, "a")
    assert len({lens_seed(0, "a"), lens_seed(1, "a"), lens_seed(0, "b")}) == 3
    assert 0 <= lens_seed(123, "demo_00") < 2**31


# --- running -------------------------------------------------------------------------------


def _write_variant(src: Path, dst: Path, *, image=None, crop=None, crop_hdu=None) -> None:
    """A copy of a demo FITS with its IMAGE replaced, or IMAGE+NOISE or one HDU cropped."""
    with fits.open(src) as hdul:
        hdus = fits.HDUList([h.copy() for h in hdul])
    for name in ("IMAGE", "NOISE") if crop_hdu is None else (crop_hdu,):
        if crop is not None:
            hdus[name].data = hdus[name].data[:crop, :crop]
    if image is not None:
        hdus["IMAGE"].data = np.full_like(hdus["IMAGE"].data, image)
    hdus.writeto(dst)


def _add_row(cat: Table, row: dict, index: int | None = None) -> None:
    """Add a row; the cells it does not give are masked (empty), not zero."""
    vals = {c: row.get(c, "" if cat[c].dtype.kind in "US" else 0) for c in cat.colnames}
    mask = {c: c not in row for c in cat.colnames}
    cat.insert_row(len(cat) if index is None else index, vals, mask=mask)


BAD_ROWS = {  # id: (file, extra cells, expected reason)
    "missing": ("nope.fits", {}, "nope.fits: file not found"),
    "corrupt": ("corrupt.fits", {}, "corrupt.fits"),
    "masked": ("nan.fits", {}, "every pixel is masked"),
    "small": ("small.fits", {}, "does not fit in the 48x48 px cutout"),
    "scale": ("demo/demo_00.fits", {"pixel_scale": 0.5, "preset": "auto"},
              "is far from the shipped models"),
    "psf": ("evenpsf.fits", {}, "PSF is 6x6; lensflow needs a square kernel with an odd side"),
    "noise": ("noise.fits", {}, "noise map shape (60, 60) != image (64, 64)"),
    "centre": ("demo/demo_00.fits", {"center_x": 31.5}, "only one of center_x, center_y"),
}  # fmt: skip


def test_run_catalog_pad_fits_a_cutout_smaller_than_the_field(tmp_path, one_thread):
    # A 60x60 crop of a demo lens for the 64x64 euclid field: failed without pad (the
    # "small" row below), fitted with pad, its 2-pixel border masked and counted.
    path = _demo_rows(tmp_path, ["demo_00"])
    _write_variant(tmp_path / "demo" / "demo_00.fits", tmp_path / "crop.fits", crop=60)
    cat = Table.read(path)
    cat["image"][0] = "crop.fits"
    for c in ("noise", "psf"):
        if c in cat.colnames:
            cat[c][0] = "crop.fits"
    cat.write(path, overwrite=True)
    res = run_catalog(path, tmp_path / "out", n=20, plots=False, progress=False, pad=True)
    assert list(res["status"]) == ["ok"]
    assert res["masked_fraction"][0] == pytest.approx(1 - 60**2 / 64**2, abs=1e-6)
    with pytest.raises(ValueError, match="pad=True"):  # resuming needs the same settings
        run_catalog(path, tmp_path / "out", n=20, plots=False, progress=False)


@pytest.mark.filterwarnings("ignore:.*pixel_scale_arcsec=0.5 overrides:UserWarning")
def test_run_catalog_records_bad_rows_and_keeps_going(tmp_path, one_thread):
    path = _demo_rows(tmp_path, ["demo_00", "demo_01"])
    good = tmp_path / "demo" / "demo_00.fits"
    _write_variant(good, tmp_path / "nan.fits", image=np.nan)
    _write_variant(good, tmp_path / "small.fits", crop=48)
    _write_variant(good, tmp_path / "evenpsf.fits", crop=6, crop_hdu="PSF")
    _write_variant(good, tmp_path / "noise.fits", crop=60, crop_hdu="NOISE")
    (tmp_path / "corrupt.fits").write_bytes(b"SIMPLE  = T" + b"\0" * 100)
    cat = Table.read(path)
    for name, (image, extra, _) in BAD_ROWS.items():
        row = {"id": name, "image": image, "noise": image, "psf": image, "pixel_scale": 0.1,
               "preset": "euclid"}  # fmt: skip
        _add_row(cat, row | extra)
    cat.write(path, overwrite=True)
    res = run_catalog(path, tmp_path / "out", n=50, plots=False, progress=False)
    assert list(res["id"]) == ["demo_00", "demo_01", *BAD_ROWS]
    assert list(res["status"]) == ["ok", "ok"] + ["failed"] * len(BAD_ROWS)
    for k, (name, (_, _, expected)) in enumerate(BAD_ROWS.items()):
        assert expected in res["reason"][k + 2], (name, res["reason"][k + 2])
    assert all("\n" not in r for r in res["reason"])
    assert res.meta["n_ok"] == 2 and res.meta["n_failed"] == len(BAD_ROWS)
    # Units, finite summaries for ok rows and NaN for failed ones, both files written.
    written = Table.read(tmp_path / "out" / "results.ecsv")
    assert written["lens_theta_e_median"].unit == u.arcsec
    assert written["wall_time_s"].unit == u.s
    assert Table.read(tmp_path / "out" / "results.fits")["lens_theta_e_p97p5"].unit == u.arcsec
    theta_e = np.asarray(written["lens_theta_e_median"])
    assert np.isfinite(theta_e[:2]).all() and np.isnan(theta_e[2:]).all()
    lo, hi = np.asarray(written["lens_theta_e_p2p5"]), np.asarray(written["lens_theta_e_p97p5"])
    assert (lo[:2] < theta_e[:2]).all() and (theta_e[:2] < hi[:2]).all()
    folder = tmp_path / "out" / "lenses" / "demo_00"
    assert {"samples.fits", "summary.ecsv", "provenance.json", "result.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert len(Table.read(folder / "samples.fits")) == 50
    # Written atomically and world-readable (mkstemp's 0600 is not kept), no temporaries left.
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
    assert not list((tmp_path / "out").rglob(".*tmp*"))
    assert (
        json.loads((tmp_path / "out" / "lenses" / "small" / "result.json").read_text())["status"]
        == "failed"
    )


def test_run_catalog_results_do_not_depend_on_row_order(tmp_path, one_thread):
    path = _demo_rows(tmp_path, ["demo_03", "demo_11"])
    cat = Table.read(path)
    cat[::-1].write(tmp_path / "rev.ecsv")
    a = run_catalog(path, tmp_path / "a", n=50, plots=False, progress=False)
    b = run_catalog(tmp_path / "rev.ecsv", tmp_path / "b", n=50, plots=False, progress=False)
    _assert_same_summaries(a, b[::-1])
    # demo_11 is an 80x80 cutout centred by center_x/center_y; its posterior must find the
    # lens (truth relative to that centre) rather than the cutout centre 0.8" away.
    truth = Table.read(DEMO_TRUTH)
    row = list(a["id"]).index("demo_11")
    t = truth[list(truth["id"]).index("demo_11")]
    assert abs(a["lens_center_x_median"][row] - t["lens_center_x"]) < 0.2
    assert abs(a["lens_theta_e_median"][row] - t["lens_theta_e"]) < 0.2


def test_run_catalog_refuses_other_settings_in_same_folder(tmp_path, one_thread):
    path = _demo_rows(tmp_path, ["demo_02"])
    run_catalog(path, tmp_path / "o", n=50, plots=False, progress=False)
    with pytest.raises(ValueError, match="holds a catalog run with n=50"):
        run_catalog(path, tmp_path / "o", n=60, plots=False, progress=False)
    with pytest.raises(ValueError, match="holds a catalog run with fallback_prior='default'"):
        run_catalog(path, tmp_path / "o", n=50, plots=False, progress=False,
                    fallback_prior="wide")  # fmt: skip
    with pytest.raises(
        ValueError, match="unknown fallback prior 'open'; choose default, broad, wide"
    ):
        run_catalog(path, tmp_path / "p", n=50, plots=False, progress=False,
                    fallback_prior="open")  # fmt: skip
    with pytest.raises(ValueError, match="unknown fallback 'hmc'; choose none, mcmc, smc"):
        run_catalog(path, tmp_path / "p", n=50, plots=False, progress=False, fallback="hmc")
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="holds a catalog run with fallback='none'"):
        run_catalog(path, tmp_path / "o", n=50, plots=False, progress=False, fallback="smc")
    again = run_catalog(path, tmp_path / "o", n=50, plots=False, progress=False)
    assert again.meta["n_skipped"] == 1 and again.meta["n_ok"] == 0
    with pytest.raises(ValueError, match="holds a catalog run with control_steps=None"):
        run_catalog(path, tmp_path / "o", n=50, plots=False, progress=False, control_steps=2)


def test_run_catalog_sampler_settings_reach_each_lens_and_bad_ones_fail_early(
    tmp_path, one_thread, capsys
):
    path = _demo_rows(tmp_path, ["demo_02"])
    kw = {"n": 20, "plots": False, "progress": False}
    run_catalog(path, tmp_path / "s", n_steps=20, control_steps=2, base_solver="midpoint", **kw)
    prov = json.loads((tmp_path / "s" / "lenses" / "demo_02" / "provenance.json").read_text())
    assert {k: prov["sampler"][k] for k in ("base_solver", "base_steps", "control_steps")} == {
        "base_solver": "midpoint", "base_steps": 16, "control_steps": 2}  # fmt: skip
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"]["n_steps"] == 20
    bad = [({"control_steps": 2, "feedback": "none"}, "control_steps=2 needs feedback"),
           ({"base_solver": "midpoint", "feedback": "none"}, "base_solver='midpoint' needs"),
           ({"solver": "eular"}, "unknown solver 'eular'"),
           ({"n_steps": 1}, "n_steps must be an integer >= 2, got 1"),
           ({"control_steps": 0}, "control_steps must be an integer >= 1, got 0")]  # fmt: skip
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            run_catalog(path, tmp_path / "bad", **kw, **extra)
        assert not (tmp_path / "bad").exists()  # refused before any output
    args = ["catalog", str(path), "--out", str(tmp_path / "bad"), "--feedback", "none"]
    assert main([*args, "--base-solver", "midpoint"]) == 2  # a one-line error, no traceback
    assert "base_solver='midpoint' needs feedback" in capsys.readouterr().err


def _cli(catalog: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lensflow.cli", "catalog", str(catalog), "--out", str(out),
            "-n", "50", "--no-plots", "--quiet", *extra]  # fmt: skip


def test_catalog_resumes_after_kill_9(tmp_path, one_thread):
    """kill -9 part way, rerun: the results equal an uninterrupted run's."""
    ids = ["demo_00", "demo_03", "demo_06", "demo_08", "demo_10", "demo_11"]
    path, out = _demo_rows(tmp_path, ids), tmp_path / "killed"
    proc = subprocess.Popen(_cli(path, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any((out / "lenses").glob("*/result.json")):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list((out / "lenses").glob("*/result.json")))
    assert 1 <= n_done < len(ids), f"kill landed after {n_done} lenses; the test needs fewer"
    assert not (out / "results.ecsv").exists()
    # Debris a killed run could leave: a stale temporary file and a partial lens folder.
    (out / "lenses" / "demo_11").mkdir(parents=True, exist_ok=True)
    (out / "lenses" / "demo_11" / ".samples.fits.x.tmp.fits").write_bytes(b"partial")
    (out / "lenses" / "demo_11" / "samples.fits").write_bytes(b"partial")

    rerun = subprocess.run(_cli(path, out), check=False, env=_env(), capture_output=True,
                           text=True)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    n_left = len(ids) - n_done
    assert f"{n_left} ok, 0 failed, {n_done} skipped (already done)" in rerun.stdout
    assert not list((out / "lenses" / "demo_11").glob(".*tmp*"))
    assert len(Table.read(out / "lenses" / "demo_11" / "samples.fits")) == 50
    # The uninterrupted run in this process, one torch thread like the subprocesses.
    straight = run_catalog(path, tmp_path / "straight", n=50, plots=False, progress=False)
    _assert_same_summaries(Table.read(out / "results.ecsv"), straight)


def test_catalog_on_dask_scheduler_address_matches_in_process(tmp_path, one_thread):
    """The --scheduler ADDRESS path, on a 2-worker thread cluster started here (fast)."""
    from dask.distributed import LocalCluster

    path = _demo_rows(tmp_path, ["demo_07", "demo_09", "demo_11"])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:  # fmt: skip
        on_dask = run_catalog(path, tmp_path / "dask", n=50, plots=False, progress=False,
                              scheduler=cluster.scheduler_address)  # fmt: skip
    assert on_dask.meta["n_ok"] == 3
    local = run_catalog(path, tmp_path / "local", n=50, plots=False, progress=False)
    _assert_same_summaries(on_dask, local)


@pytest.mark.slow
def test_catalog_dask_local_cluster_matches_in_process(tmp_path, one_thread):
    """``--workers 2``: a LocalCluster of two worker processes (~25-50 s, mostly startup)."""
    path = _demo_rows(tmp_path, ["demo_04", "demo_05", "demo_06"])
    cat = Table.read(path)
    _add_row(cat, {"id": "gone", "image": "gone.fits", "preset": "euclid"}, index=1)
    cat.write(path, overwrite=True)
    dask = subprocess.run(_cli(path, tmp_path / "dask", "--workers", "2"), check=False,
                          env=_env(), capture_output=True, text=True)  # fmt: skip
    assert dask.returncode == 0, dask.stderr
    assert "3 ok, 1 failed" in dask.stdout
    local = run_catalog(path, tmp_path / "local", n=50, plots=False, progress=False)
    _assert_same_summaries(Table.read(tmp_path / "dask" / "results.ecsv"), local)


@pytest.mark.slow
def test_demo_catalog_truths_inside_posteriors(tmp_path, one_thread):
    """The shipped euclid model on the lenstronomy-rendered demo: truths inside 99.7%.

    Measured (n=1000, CPU): theta_E inside for 11 of 12 lenses (demo_08, theta_E = 0.57",
    is overestimated), 251 of 252 (lens, parameter) truths inside; 96% inside the 95%
    intervals. The bounds leave room for the provisional model's miscalibration.
    """
    res = run_catalog(DEMO, tmp_path / "demo", n=1000, plots=False, progress=False)
    assert res.meta["n_ok"] == 12
    truth = Table.read(DEMO_TRUTH)
    inside = np.zeros((12, len(NAMES)), dtype=bool)
    for k, lens_id in enumerate(res["id"]):
        samples = Table.read(tmp_path / "demo" / "lenses" / lens_id / "samples.fits")
        t = truth[list(truth["id"]).index(lens_id)]
        for j, name in enumerate(NAMES):
            lo, hi = np.quantile(np.asarray(samples[name]), [0.0015, 0.9985])
            inside[k, j] = lo <= float(t[name]) <= hi
    theta_e = inside[:, NAMES.index("lens_theta_e")]
    assert theta_e.sum() >= 10, f"theta_E inside 99.7% for {theta_e.sum()} of 12"
    assert inside.mean() >= 0.9, f"{inside.mean():.3f} of truths inside 99.7%"


@pytest.mark.slow
def test_fallback_mcmc_reruns_flagged_lenses_and_resumes(tmp_path, monkeypatch, one_thread):
    import lensflow.fit as fit_module

    # Short chains: this checks the plumbing, not convergence (docs/fit.md has the numbers).
    monkeypatch.setattr(fit_module, "FALLBACK_EMCEE",
                        {"n_walkers": 64, "n_burn": 20, "n_steps": 20})  # fmt: skip
    cat = _demo_rows(tmp_path, ["demo_08"])
    out = tmp_path / "run"
    table = run_catalog(cat, out, n=64, fallback="mcmc", plots=False, progress=False)
    row = table[0]
    assert row["status"] == "ok" and not row["flow_reliable"]  # the provisional model
    assert row["fallback"] == "emcee" and row["method"] == "emcee"
    assert not row["fallback_converged"]  # 20 steps are far from 50 tau
    assert row["fallback_init"].startswith(("flow", "optimizer"))
    # demo_08's flow posterior sits in a wrong mode (theta_E ~0.8" vs 0.566"): the
    # optimizer's restart brings the chain near the truth.
    truth = Table.read(DEMO_TRUTH)
    true_te = float(truth[truth["id"] == "demo_08"]["lens_theta_e"][0])
    assert abs(row["lens_theta_e_median"] - true_te) < 0.05
    again = run_catalog(cat, out, n=64, fallback="mcmc", plots=False, progress=False)
    assert again.meta["n_skipped"] == 1 and again["lens_theta_e_median"][0] == pytest.approx(
        row["lens_theta_e_median"]
    )
    with pytest.raises(ValueError, match="fallback='mcmc'"):
        run_catalog(cat, out, n=64, fallback="none", plots=False, progress=False)
