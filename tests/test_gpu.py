"""CUDA paths against their CPU twins (marked ``gpu``; skipped without CUDA).

The simulator's own CUDA test is in test_simulator.py. These pin the rest of the pipeline
on a GPU: live training, the batched sampler and its log-density, the feedback sampler of
the user path (``sampling.sample_posteriors`` with a shipped control net), and the
evaluation of a checkpoint trained on the GPU on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lensflow.checkpoint import load_model
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig, TrainConfig
from lensflow.data import SimulatedPairs
from lensflow.sampling import sample_posteriors
from lensflow.train import train_model

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 on both sides (cuDNN convolutions default to TF32 on Ampere+)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


TINY_SIM = SimulatorConfig(name="tiny", n_pix=24, pixel_scale_arcsec=0.25, upsample_factor=2)
TINY_DATA = DataConfig(psf_fwhm_min_arcsec=0.3, psf_fwhm_max_arcsec=0.5, n_psf_grid=2)
TINY_FLOW = FlowConfig(base_channels=4, n_stages=2, embed_dim=16, width=32, n_blocks=1)


def test_live_training_on_cuda_saves_a_cpu_loadable_model(tmp_path):
    cfg = TrainConfig(n_steps=30, batch_size=16, warmup_steps=5, val_every=10, n_val=32,
                      checkpoint_every=10, times_per_example=2)  # fmt: skip
    result = train_model(TINY_SIM, TINY_DATA, TINY_FLOW, cfg, out_dir=tmp_path, device="cuda")
    assert result.steps == 30
    assert all(torch.isfinite(torch.tensor(result.val_loss)))
    assert result.val_loss[-1] < result.val_loss[0]  # it learns
    model = load_model(tmp_path / "model")  # on the CPU
    assert "cuda" not in str(next(model.posterior.parameters()).device)
    assert model.meta["training"]["device"] == torch.cuda.get_device_name(0)
    # the saved EMA weights are the trained ones, bit for bit
    for (name, p_gpu), p_cpu in zip(
        result.field.state_dict().items(), model.posterior.field.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=0, atol=0, msg=name)


def test_time_limited_training_on_cuda_stops_and_checkpoints(tmp_path):
    cfg = TrainConfig(n_steps=10**6, batch_size=8, warmup_steps=2, val_every=10**5, n_val=16,
                      checkpoint_every=10**5, time_limit_s=3.0)  # fmt: skip
    result = train_model(TINY_SIM, TINY_DATA, TINY_FLOW, cfg, out_dir=tmp_path, device="cuda")
    assert 1 <= result.steps < 10**6
    assert len(result.val_loss) == 1  # the final validation
    assert (tmp_path / "train_state.safetensors").is_file()


def _shipped(name: str, device: str):
    model = load_model(name)
    model.posterior.to(device)
    return model


@pytest.mark.parametrize("name", ["euclid", "hst"])
def test_flow_sampling_and_log_prob_cuda_match_cpu(name):
    cpu, gpu = _shipped(name, "cpu"), _shipped(name, "cuda")
    pairs = SimulatedPairs(cpu.simulator, cpu.data)
    test = pairs.sample(4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(8, 4, 21, generator=torch.Generator().manual_seed(4))
    a = cpu.posterior.sample_u(test.x, 8, noise=noise)
    b = gpu.posterior.sample_u(test.x.cuda(), 8, noise=noise.cuda()).cpu()
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    theta = cpu.posterior.transform.from_u(a[:, 0])
    x_rep = test.x[:1].expand(8, *test.x.shape[1:])
    lp_cpu = cpu.posterior.log_prob(theta, x_rep, n_steps=8)
    lp_gpu = gpu.posterior.log_prob(theta.cuda(), x_rep.cuda(), n_steps=8).cpu()
    torch.testing.assert_close(lp_gpu, lp_cpu, rtol=1e-3, atol=2e-2)


def test_feedback_sampling_cuda_matches_cpu():
    cpu, gpu = _shipped("euclid", "cpu"), _shipped("euclid", "cuda")
    pairs = SimulatedPairs(cpu.simulator, cpu.data)
    test = pairs.sample(3, generator=torch.Generator().manual_seed(5))
    obs = pairs.observations(test)
    seeds = [11, 12, 13]
    a = sample_posteriors(obs, cpu, 16, feedback="gradient", seeds=seeds)
    b = sample_posteriors(obs, gpu, 16, feedback="gradient", seeds=seeds)
    assert b[0].theta.device.type == "cuda" and a[0].method == b[0].method == "flow+gradient"
    for sa, sb in zip(a, b, strict=True):
        # same seeds (drawn on the CPU, so the same noise), same control; float32 on two
        # devices through 20 steps with a simulator gradient in the loop: agree to a small
        # fraction of the posterior width
        width = sa.theta.std(0)
        diff = (sb.theta.cpu() - sa.theta).abs().amax(0)
        assert torch.all(diff < 0.05 * width + 1e-6), (diff / width).max()


def test_simulated_pairs_on_cuda_have_the_cpu_distribution():
    data = dataclasses.replace(TINY_DATA, mask_probability=0.5)
    gpu = SimulatedPairs(TINY_SIM, data, device="cuda").sample(
        4000, generator=torch.Generator("cuda").manual_seed(0)
    )
    cpu = SimulatedPairs(TINY_SIM, data).sample(4000, generator=torch.Generator().manual_seed(0))
    assert gpu.x.device.type == "cuda" and torch.isfinite(gpu.x).all()
    # different streams, same distribution: prior means and mask rates agree statistically
    se = cpu.theta.std(0) * (2 / 4000) ** 0.5
    assert torch.all((gpu.theta.mean(0).cpu() - cpu.theta.mean(0)).abs() < 5 * se)
    rate_gpu = float((~gpu.mask).flatten(1).any(1).float().mean())
    rate_cpu = float((~cpu.mask).flatten(1).any(1).float().mean())
    assert abs(rate_gpu - rate_cpu) < 0.06


def test_feedback_cost_takes_larger_calls_on_cuda():
    from lensflow.config import preset
    from lensflow.feedback import GRADIENT_MEMORY_BYTES, gradient_memory_bytes, lens_cost

    assert gradient_memory_bytes("cpu") == GRADIENT_MEMORY_BYTES
    assert gradient_memory_bytes("cuda") >= GRADIENT_MEMORY_BYTES
    pairs = SimulatedPairs(preset("euclid"), DataConfig(n_psf_grid=1))
    obs = pairs.observations(pairs.sample(1, generator=torch.Generator().manual_seed(0)))
    cpu, _ = lens_cost(obs, preset("euclid"), device="cpu")
    gpu, data = lens_cost(obs, preset("euclid"), device="cuda")
    assert gpu.max_rows >= cpu.max_rows and data.x.device.type == "cuda"


def test_feedback_cost_mixed_psfs_match_cpu():
    """Lenses with different PSFs in one call on CUDA: the CPU's chi^2 and gradient."""
    from lensflow.config import preset
    from lensflow.feedback import lens_cost
    from lensflow.params import UnconstrainedTransform

    cfg = preset("euclid")
    pairs = SimulatedPairs(cfg, DataConfig(n_psf_grid=3))
    obs = pairs.observations(pairs.sample(8, generator=torch.Generator().manual_seed(1)))
    assert len({tuple(o.psf.flatten().tolist()) for o in obs}) == 3
    tr = UnconstrainedTransform()
    theta = pairs.prior.sample((8,), generator=torch.Generator().manual_seed(2))
    u = tr.to_u(theta).requires_grad_(True)
    cpu, rows = lens_cost(obs, cfg, tr, device="cpu")
    want = cpu(u, rows)
    (want_grad,) = torch.autograd.grad(want.sum(), u)
    gpu, rows_gpu = lens_cost(obs, cfg, tr, device="cuda")
    u_gpu = u.detach().cuda().requires_grad_(True)
    got = gpu(u_gpu, rows_gpu)
    (grad,) = torch.autograd.grad(got.sum(), u_gpu)
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        grad.cpu(), want_grad, rtol=1e-3, atol=1e-3 * float(want_grad.abs().max())
    )


def test_compiled_feedback_cost_matches_eager_on_cuda():
    """``lens_cost(compile=True)``: the eager chi^2 and gradient, over two padded chunks."""
    from lensflow.config import preset
    from lensflow.feedback import COMPILED_ROWS, lens_cost
    from lensflow.params import UnconstrainedTransform

    cfg = preset("euclid")
    pairs = SimulatedPairs(cfg, DataConfig(n_psf_grid=3))
    obs = pairs.observations(pairs.sample(8, generator=torch.Generator().manual_seed(1)))
    tr = UnconstrainedTransform()
    n = COMPILED_ROWS["cuda"] + 100  # one full chunk and one padded
    theta = pairs.prior.sample((n,), generator=torch.Generator().manual_seed(2))
    u = tr.to_u(theta).cuda()
    results = []
    for compile in (False, True):
        cost, data = lens_cost(obs, cfg, tr, device="cuda", compile=compile)
        rows = data[torch.arange(n, device="cuda") % len(obs)]
        uu = u.clone().requires_grad_(True)
        c = cost(uu, rows)
        (g,) = torch.autograd.grad(c.sum(), uu)
        results.append((c.detach(), g))
    (want, want_grad), (got, grad) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        grad, want_grad, rtol=1e-3, atol=1e-3 * float(want_grad.abs().max())
    )
