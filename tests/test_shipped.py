"""The shipped models and their control nets: they load together, and feedback helps."""

import json

import pytest
import torch

from lensflow.checkpoint import available_feedback, load_control, load_model
from lensflow.data import SimulatedPairs
from lensflow.fit import diagnose
from lensflow.sampling import sample_posteriors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", ["euclid", "hst"])
def test_shipped_control_nets_load_against_their_base_as_recorded(preset):
    model = load_model(preset)
    kinds = available_feedback(model)
    assert kinds == ("gradient", "learned")
    for kind in kinds:
        control = load_control(kind, model)  # checks the base weights' SHA-256
        meta = json.loads(control.path.read_text())
        assert control.kind == kind and control.t_start == meta["t_start"] == 0.8
        assert (control.n_steps, control.solver) == (meta["n_steps"], meta["solver"])
        net = control.control
        assert (net.width, net.n_blocks) == (meta["width"], meta["n_blocks"])
        n_par = sum(p.numel() for p in net.parameters())
        if control.encoder is not None:
            n_par += sum(p.numel() for p in control.encoder.parameters())
        assert n_par == meta["n_parameters"]
        assert meta["status"], "a shipped control net says how it was trained"


@pytest.mark.parametrize("preset", ["euclid", "hst"])
def test_shipped_gradient_feedback_cuts_the_excess_chi2_of_held_out_lenses(preset):
    """The shipped default (gradient feedback) against the flow's own default sampler.

    On 200 held-out lenses the cut is 81% (euclid) and 74% (hst) of the excess mean reduced
    chi^2 (docs/feedback.md); 8 seeded lenses x 24 samples must show at least half of that.
    """
    model = load_model(preset)
    source = SimulatedPairs(model.simulator, model.data)
    pairs = source.sample(8, generator=torch.Generator().manual_seed(11))
    observations = source.observations(pairs)
    seeds = list(range(len(observations)))
    flow = sample_posteriors(observations, model, 24, seeds=seeds)
    with_feedback = sample_posteriors(observations, model, 24, feedback="gradient", seeds=seeds)

    def excess(samples):
        chi2 = [
            diagnose(o, s, model, n_samples=24)[0].chi2_red_samples
            for o, s in zip(observations, samples, strict=True)
        ]
        return sum(chi2) / len(chi2) - 1.0

    before, after = excess(flow), excess(with_feedback)
    assert before > 1.0, "the flow alone leaves an excess to cut"
    assert after < 0.6 * before
    for s in with_feedback:
        assert torch.isfinite(s.theta).all()
        assert s.method == "flow+gradient"
