"""Registry invariants, conversions and their round trips (pins the e1/e2 convention)."""

import math

import astropy.units as u
import pytest
import torch

from lensflow import params
from lensflow.params import (
    CAUSTICS_ORDER,
    NAMES,
    REGISTRY,
    e1e2_to_qphi,
    from_caustics,
    from_unconstrained,
    index,
    qphi_to_e1e2,
    to_caustics,
    to_unconstrained,
)
from lensflow.prior import Prior

ISSUE_NAMES = [
    "lens_theta_e",
    "lens_e1",
    "lens_e2",
    "lens_center_x",
    "lens_center_y",
    "shear_gamma1",
    "shear_gamma2",
    "source_amp",
    "source_r_sersic",
    "source_n_sersic",
    "source_e1",
    "source_e2",
    "source_center_x",
    "source_center_y",
    "lens_light_amp",
    "lens_light_r_sersic",
    "lens_light_n_sersic",
    "lens_light_e1",
    "lens_light_e2",
    "lens_light_center_x",
    "lens_light_center_y",
]


def test_registry_names_and_order_are_the_public_interface():
    assert list(NAMES) == ISSUE_NAMES
    assert len(set(NAMES)) == 21


@pytest.mark.parametrize("spec", REGISTRY, ids=NAMES)
def test_registry_entry_is_complete(spec):
    u.Unit(spec.unit)  # astropy-parsable
    assert spec.label.startswith("$")
    assert spec.caustics and spec.lenstronomy
    assert spec.low <= spec.prior_low < spec.prior_high <= spec.high


def test_index_unknown_name_lists_valid_names():
    assert index("lens_theta_e") == 0
    with pytest.raises(KeyError, match="lens_theta_e"):
        index("theta_E")


def test_qphi_e1e2_known_values():
    # q = 0.5 along +x: e = 1/3 all in e1; rotated by 45 deg: all in e2 (lenstronomy's param_util).
    e1, e2 = qphi_to_e1e2(torch.tensor(0.5), torch.tensor(0.0))
    torch.testing.assert_close((e1, e2), (torch.tensor(1 / 3), torch.tensor(0.0)))
    e1, e2 = qphi_to_e1e2(torch.tensor(0.5), torch.tensor(math.pi / 4))
    torch.testing.assert_close(
        (e1, e2), (torch.tensor(0.0), torch.tensor(1 / 3)), atol=1e-7, rtol=0
    )


def test_qphi_e1e2_round_trip(dtype):
    g = torch.Generator().manual_seed(1)
    q = 0.05 + 0.95 * torch.rand(500, generator=g, dtype=dtype)
    phi = (torch.rand(500, generator=g, dtype=dtype) - 0.5) * math.pi * 0.999
    q2, phi2 = e1e2_to_qphi(*qphi_to_e1e2(q, phi))
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(phi2, phi)


def test_e1e2_to_qphi_gradient_finite_at_round():
    e = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    q, phi = e1e2_to_qphi(e[0], e[1])
    (q + phi).backward()
    assert torch.isfinite(e.grad).all()
    assert float(q.detach()) == 1.0


def test_caustics_mapping_round_trip_and_order(dtype):
    theta = Prior(dtype=dtype).sample((256,))
    mapped = to_caustics(theta)
    assert tuple(mapped) == CAUSTICS_ORDER
    torch.testing.assert_close(from_caustics(mapped), theta)


def test_caustics_mapping_sersic_radius_is_major_axis():
    # lenstronomy R_sersic = sqrt(a b) = Re_caustics * sqrt(q)  (conventions-notes, Sersic radius).
    theta = Prior(dtype=torch.float64).sample((1,))
    theta[0, index("source_e1")], theta[0, index("source_e2")] = 1 / 3, 0.0  # q = 0.5
    theta[0, index("source_r_sersic")] = 0.2
    mapped = to_caustics(theta)
    torch.testing.assert_close(mapped["source.q"], torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(
        mapped["source.Re"], torch.tensor([0.2 / math.sqrt(0.5)], dtype=torch.float64)
    )


def test_unconstrained_round_trip(dtype):
    theta = Prior(dtype=dtype).sample((1024,))
    u_ = to_unconstrained(theta)
    assert torch.isfinite(u_).all()
    # Tolerance: the logit/sigmoid pair loses ~1e-6 relative in float32.
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(from_unconstrained(u_), theta, rtol=tol, atol=tol)


def test_unconstrained_is_standardized_under_prior():
    theta = Prior(dtype=torch.float64).sample((200_000,))
    u_ = to_unconstrained(theta)
    # Monte-Carlo error of a mean over 2e5 draws is ~0.002; of a std ~0.002.
    torch.testing.assert_close(u_.mean(0), torch.zeros(21, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(u_.std(0), torch.ones(21, dtype=torch.float64), atol=0.02, rtol=0)


def test_from_unconstrained_stays_inside_physical_bounds():
    u_ = 30 * torch.randn(4096, 21, dtype=torch.float64)
    theta = from_unconstrained(u_)
    low = torch.tensor([p.low for p in REGISTRY], dtype=torch.float64)
    high = torch.tensor([p.high for p in REGISTRY], dtype=torch.float64)
    assert ((theta >= low) & (theta <= high)).all()


def test_unconstrained_rejects_wrong_width():
    with pytest.raises(ValueError, match="21"):
        to_unconstrained(torch.zeros(3, 20))


def test_paramspec_rejects_prior_outside_bounds():
    with pytest.raises(ValueError, match="inside the physical bounds"):
        params.ParamSpec("x", "", 0.0, 1.0, "uniform", -1.0, 0.5, "$x$", "a.b", "k")
