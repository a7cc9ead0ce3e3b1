"""Training loop: learning, EMA, resume, validation, and DDP with two gloo processes."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lensflow.checkpoint import build_posterior
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig, TrainConfig
from lensflow.data import SimulatedPairs
from lensflow.flow import FlowMatchingLoss
from lensflow.train import fit, learning_rate, validation_loss

TINY = SimulatorConfig(name="tiny", n_pix=16, pixel_scale_arcsec=0.3, upsample_factor=1,
                       psf_fwhm_arcsec=0.5)  # fmt: skip
TINY_DATA = DataConfig(psf_fwhm_min_arcsec=0.4, psf_fwhm_max_arcsec=0.6, n_psf_grid=2)
TINY_FLOW = FlowConfig(embed_dim=16, base_channels=4, n_stages=2, width=32, n_blocks=1,
                       time_dim=8, n_steps=4)  # fmt: skip
TINY_TRAIN = TrainConfig(n_steps=50, batch_size=8, lr=1e-2, warmup_steps=5, val_every=25,
                         ema_decay=0.9, n_val=32, checkpoint_every=10)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        posterior = build_posterior(TINY_FLOW)
    loss = FlowMatchingLoss(posterior.field, sigma_min=TINY_FLOW.sigma_min)
    source = SimulatedPairs(TINY, TINY_DATA)
    val = source.sample(32, generator=torch.Generator().manual_seed(99))
    return posterior, loss, source, val


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(n_steps=100, warmup_steps=10, lr=2.0)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[9] == 2.0 and max(lrs) == 2.0 and lrs[0] == 0.2
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_fit_reduces_validation_loss_and_tracks_ema():
    posterior, loss, source, val = _setup()
    before = [p.detach().clone() for p in posterior.field.parameters()]
    val_before = validation_loss(loss, posterior.transform, val)
    result = fit(loss, posterior.transform, source, val, TINY_TRAIN)
    assert result.steps == 50 and len(result.train_loss) == 50
    assert result.val_steps == (25, 50)
    # The untrained field's loss is ~2 (|u|^2 + |z|^2 per dimension). 50 steps of batch 8
    # lower the (fixed-noise, hence deterministic) validation loss by ~6%.
    assert result.val_loss[-1] < 0.97 * val_before
    # The EMA differs from both the initial and the final raw weights.
    ema = list(result.field.parameters())
    raw = list(posterior.field.parameters())
    assert any(not torch.equal(e, r) for e, r in zip(ema, raw, strict=True))
    assert any(not torch.equal(e, b) for e, b in zip(ema, before, strict=True))


def test_learning_rate_follows_the_clock_when_time_limited():
    cfg = TrainConfig(n_steps=10**6, warmup_steps=10, lr=2.0, time_limit_s=100.0)
    assert learning_rate(5, cfg, elapsed_s=90.0) == 1.2  # warmup counts steps
    assert learning_rate(50, cfg, elapsed_s=0.0) == pytest.approx(2.0)
    assert learning_rate(50, cfg, elapsed_s=50.0) == pytest.approx(1.0)
    assert learning_rate(50, cfg, elapsed_s=150.0) == 0.0
    # the step fraction wins when it is further along
    both = TrainConfig(n_steps=110, warmup_steps=10, lr=2.0, time_limit_s=100.0)
    assert learning_rate(110, both, elapsed_s=1.0) == 0.0


def test_fit_stops_at_its_time_limit_with_a_final_validation_and_checkpoint(tmp_path):
    cfg = TrainConfig(n_steps=10**6, batch_size=4, warmup_steps=1, val_every=10**5, n_val=8,
                      checkpoint_every=10**5, time_limit_s=1.0)  # fmt: skip
    posterior, loss, source, val = _setup()
    result = fit(loss, posterior.transform, source, val, cfg, checkpoint_dir=tmp_path)
    assert 1 <= result.steps < 10**6
    assert result.val_steps == (result.steps,) and len(result.train_loss) == result.steps
    assert result.wall_time_s >= 1.0
    record = (tmp_path / "train_state.json").read_text()
    assert f'"step": {result.steps}' in record


def test_times_per_example_reuses_each_embedding():
    posterior, _, source, _ = _setup()
    batch = source.sample(3, generator=torch.Generator().manual_seed(1))
    u = posterior.transform.to_u(batch.theta)
    one = FlowMatchingLoss(posterior.field)
    four = FlowMatchingLoss(posterior.field, times_per_example=4)
    # with 1 draw, the loss is the earlier single-draw loss on the same random stream
    from lensflow.flow import flow_matching_loss, sample_times

    g = torch.Generator().manual_seed(5)
    t = sample_times(3, generator=g)
    z = torch.randn(u.shape, generator=g)
    h = posterior.field.embed(batch.x)
    expected = flow_matching_loss(posterior.field.velocity, u, h, t, z)
    assert torch.equal(one(u, batch.x, generator=torch.Generator().manual_seed(5)), expected)
    # with 4, it is the same loss on the batch repeated 4 times, drawing 12 times and noises
    g = torch.Generator().manual_seed(5)
    t4 = sample_times(12, generator=g)
    z4 = torch.randn((12, u.shape[1]), generator=g)
    expected4 = flow_matching_loss(posterior.field.velocity, u.repeat(4, 1), h.repeat(4, 1),
                                   t4, z4)  # fmt: skip
    got = four(u, batch.x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected4)
    with pytest.raises(ValueError, match="times_per_example"):
        FlowMatchingLoss(posterior.field, times_per_example=0)


def test_fit_resume_matches_uninterrupted_run(tmp_path):
    cfg = TrainConfig(n_steps=20, batch_size=8, warmup_steps=5, val_every=10, n_val=16,
                      checkpoint_every=10)  # fmt: skip
    posterior, loss, source, val = _setup()
    full = fit(loss, posterior.transform, source, val, cfg)
    posterior2, loss2, _, _ = _setup()
    fit(loss2, posterior2.transform, source, val, cfg, checkpoint_dir=tmp_path, stop_at_step=10)
    posterior3, loss3, _, _ = _setup(seed=123)  # other init: everything must come from disk
    resumed = fit(loss3, posterior3.transform, source, val, cfg, checkpoint_dir=tmp_path,
                  resume=True)  # fmt: skip
    assert resumed.steps == 20 and resumed.train_loss == full.train_loss
    for a, b in zip(full.field.state_dict().values(), resumed.field.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    for a, b in zip(posterior.field.parameters(), posterior3.field.parameters(), strict=True):
        assert torch.equal(a, b)


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from test_train import _setup, TrainConfig
from lensflow.train import fit
torch.set_num_threads(1)
dist.init_process_group("gloo")
posterior, loss, source, val = _setup(seed=dist.get_rank())  # different inits: DDP syncs them
cfg = TrainConfig(n_steps={n_steps}, batch_size=4, warmup_steps=2, val_every=3, n_val=8,
                  time_limit_s={limit})
result = fit(loss, posterior.transform, source, val, cfg)
open({out!r} + f"/steps{{dist.get_rank()}}.txt", "w").write(str(result.steps))
state = {{k: v.contiguous() for k, v in posterior.field.state_dict().items()}}
save_file(state, {out!r} + f"/rank{{dist.get_rank()}}.safetensors")
dist.destroy_process_group()
"""


@pytest.mark.parametrize(("n_steps", "limit"), [(6, None), (10**6, 2.0)])
def test_fit_ddp_two_gloo_processes_agree(tmp_path, n_steps, limit):
    # With a time limit, rank 0's clock sets every rank's learning rate and stop.
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(tests=str(Path(__file__).parent),
                                                         out=str(tmp_path), n_steps=n_steps,
                                                         limit=limit)))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29533", str(script)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    steps = [int((tmp_path / f"steps{r}.txt").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] and (limit is not None or steps[0] == 6)
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0)


def test_load_config_reads_training_tables(tmp_path):
    from lensflow.config import DATA_PRESETS, load_config, to_toml

    path = tmp_path / "c.toml"
    path.write_text('[simulator]\npreset = "hst"\n[data]\npreset = "hst"\nn_psf_grid = 3\n'
                    "[flow]\nwidth = 64\n[train]\nn_steps = 7\n")  # fmt: skip
    configs = load_config(path)
    assert configs["data"].n_psf_grid == 3
    assert configs["data"].psf_fwhm_max_arcsec == DATA_PRESETS["hst"].psf_fwhm_max_arcsec
    assert configs["flow"].width == 64 and configs["train"].n_steps == 7
    path.write_text(to_toml(configs))
    assert load_config(path) == configs
    path.write_text("[train]\nn_stepz = 7\n")
    with pytest.raises(ValueError, match="n_stepz"):
        load_config(path)
