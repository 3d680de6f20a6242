"""pyinterp.integrations inside the host libraries, on CPU: with apply() active, each host's forward
outputs, losses and gradients against the unpatched host, AuxK with dead latents, save/load, the
pyinterp kernels really running, a training-parity run, the fused mode's documented differences,
and apply() refusing a host version or signature it was not written for."""
from __future__ import annotations

import os

import pytest
import torch
from packaging.version import Version

# sparsify picks its decoder once, at import: its Triton decoder needs a GPU.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pyinterp.integrations._patching  # noqa: E402
from pyinterp.integrations import HostMismatch  # noqa: E402


def pyinterp_ops_called(fn) -> set[str]:
    """The pyinterp:: custom ops that ran (forward and backward) while fn() ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events() if event.name.startswith("pyinterp::")}


def grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, skip=(), **tol) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        if name not in skip:
            torch.testing.assert_close(actual[name], expected[name], **tol, msg=lambda m: f"{name}: {m}")


def sorted_codes(values, indices):
    """(values, indices) of each row in latent order, to compare codes whatever order they came in."""
    order = indices.argsort(dim=-1)
    return values.gather(-1, order), indices.gather(-1, order)


def sparse_data(rows: int, width: int, atoms: int, active: int, generator) -> torch.Tensor:
    """Rows that are sparse non-negative combinations of `atoms` random unit directions (+ an offset):
    data an SAE can learn in a few hundred steps."""
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, width, generator=generator), dim=1)
    chosen = torch.rand(rows, atoms, generator=generator).argsort(dim=1)[:, :active]
    weights = torch.rand(rows, active, generator=generator) + 0.5
    return torch.einsum("na,nad->nd", weights, dictionary[chosen]) + 0.3


@torch.no_grad()
def held_out_fvu(autoencoder, x: torch.Tensor) -> float:
    """Fraction of variance unexplained of a module whose forward returns the reconstruction."""
    return float((x - autoencoder(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


PARITY_STEPS = 200  # training-parity runs: steps of 32 tokens, unpatched vs faithful


# ---------------------------------------------------------------- EleutherAI sparsify
@pytest.fixture(scope="module")
def sparsify():
    host = pytest.importorskip("sparsify", reason="could not import sparsify (pip install -r requirements-peers.txt)")
    from pyinterp.integrations import sparsify as integration
    return host, integration


def make_coder(host, width=16, latents=96, k=5, dtype=torch.float64, seed=0, **cfg):
    torch.manual_seed(seed)
    coder = host.SparseCoder(width, host.SparseCoderConfig(num_latents=latents, k=k, **cfg), dtype=dtype)
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    return coder


def sparsify_step(coder, x, dead_mask):
    for p in coder.parameters():
        p.grad = None
    out = coder(x, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss).backward()
    return out, grads(coder)


def test_sparsify_nothing_patched_on_import(sparsify):
    host, integration = sparsify
    import sparsify.fused_encoder
    import sparsify.sparse_coder
    import sparsify.utils

    assert not integration.is_applied()
    assert sparsify.sparse_coder.fused_encoder is sparsify.fused_encoder.fused_encoder
    assert sparsify.sparse_coder.decoder_impl is sparsify.utils.decoder_impl
    assert host.SparseCoder.forward.__module__ == "sparsify.sparse_coder"


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("num_dead", [0, 3, 60])
def test_sparsify_forward_losses_grads_match_host(sparsify, mode, num_dead):
    host, integration = sparsify
    coder = make_coder(host)
    x = torch.randn(37, 16, dtype=torch.float64) + 0.5
    dead_mask = torch.zeros(96, dtype=torch.bool)
    dead_mask[torch.randperm(96, generator=torch.Generator().manual_seed(1))[:num_dead]] = True
    expected, expected_grads = sparsify_step(coder, x, dead_mask)
    with integration.apply(mode):
        actual, actual_grads = sparsify_step(coder, x, dead_mask)
    assert type(actual) is type(expected)
    assert actual.latent_indices.dtype == torch.int64 and actual.latent_acts.dtype == torch.float64
    torch.testing.assert_close(actual.sae_out, expected.sae_out)
    torch.testing.assert_close(sorted_codes(actual.latent_acts, actual.latent_indices),
                               sorted_codes(expected.latent_acts, expected.latent_indices))
    torch.testing.assert_close(actual.fvu, expected.fvu)
    torch.testing.assert_close(actual.auxk_loss, expected.auxk_loss)
    assert (actual.auxk_loss > 0) == (num_dead > 0)
    # fused: AuxK's gradient also reaches the encoder (checked against a dense reference below)
    encoder_differs = mode == "fused" and num_dead > 0
    assert_grads_close(actual_grads, expected_grads,
                       skip=("encoder.weight", "encoder.bias", "b_dec") if encoder_differs else ())
    if encoder_differs:
        assert not torch.allclose(actual_grads["encoder.weight"], expected_grads["encoder.weight"])


def test_sparsify_fused_auxk_trains_the_encoder(sparsify):
    """fused mode's documented difference: the AuxK gradient reaches W_enc, b_enc and b_dec, as a
    dense reference that keeps the gradient of the dead latents' pre-activations computes it."""
    host, integration = sparsify
    coder = make_coder(host)
    x = torch.randn(29, 16, dtype=torch.float64)
    dead_mask = torch.arange(96) % 3 == 0
    pre_acts = torch.relu(torch.nn.functional.linear(x - coder.b_dec, coder.encoder.weight, coder.encoder.bias))
    top_acts, top_indices = pre_acts.topk(5)
    sae_out = torch.nn.functional.embedding_bag(top_indices, coder.W_dec, per_sample_weights=top_acts,
                                                mode="sum") + coder.b_dec
    e = x - sae_out
    variance = (x - x.mean(0)).pow(2).sum()
    k_aux = 8  # d_in / 2, fewer than the 32 dead
    aux_acts, aux_indices = torch.where(dead_mask, pre_acts, -torch.inf).topk(k_aux)
    e_hat = torch.nn.functional.embedding_bag(aux_indices, coder.W_dec, per_sample_weights=aux_acts, mode="sum")
    (e.pow(2).sum() / variance + (e_hat - e.detach()).pow(2).sum() / variance).backward()
    expected = grads(coder)
    with integration.apply("fused"):
        _, actual = sparsify_step(coder, x, dead_mask)
    assert_grads_close(actual, expected)


def test_sparsify_kernels_really_run(sparsify):
    host, integration = sparsify
    coder = make_coder(host, dtype=torch.float32)
    x, dead_mask = torch.randn(8, 16), torch.arange(96) < 40
    step = lambda: sparsify_step(coder, x, dead_mask)  # noqa: E731
    assert pyinterp_ops_called(step) == set()
    for mode in ("faithful", "fused"):
        with integration.apply(mode):
            ops = pyinterp_ops_called(step)
        assert {"pyinterp::topk_encode", "pyinterp::sparse_decode"} <= ops, ops


@pytest.mark.parametrize("mode", ["faithful", "fused"])
def test_sparsify_encode_decode_and_instance_patch(sparsify, mode):
    host, integration = sparsify
    coder, other = make_coder(host), make_coder(host, seed=1)
    x = torch.randn(11, 16, dtype=torch.float64)
    expected, expected_other = coder.encode(x), other(x)
    patches = integration.apply(mode, sae=coder)
    try:
        actual = coder.encode(x)
        assert type(actual) is type(expected) and actual.top_indices.dtype == torch.int64
        torch.testing.assert_close(sorted_codes(actual.top_acts, actual.top_indices),
                                   sorted_codes(expected.top_acts, expected.top_indices))
        if mode == "faithful":
            torch.testing.assert_close(actual.pre_acts, expected.pre_acts)
        else:
            assert actual.pre_acts is None
        decoded = coder.decode(actual.top_acts, actual.top_indices)
        torch.testing.assert_close(decoded, host.SparseCoder.decode(coder, actual.top_acts, actual.top_indices))
        # the other instance runs the host's own code
        assert pyinterp_ops_called(lambda: other(x)) == set()
        torch.testing.assert_close(other(x).sae_out, expected_other.sae_out)
        with pytest.raises(RuntimeError, match="patched already"):
            integration.apply(mode, sae=coder)
    finally:
        patches.revert()
    assert "forward" not in vars(coder)


def test_sparsify_empty_batch(sparsify):
    host, integration = sparsify
    coder = make_coder(host)
    x = torch.zeros(0, 16, dtype=torch.float64)
    expected = coder.encode(x)
    with integration.apply("faithful"):
        actual = coder.encode(x)
        decoded = coder.decode(actual.top_acts, actual.top_indices)
    assert actual.top_acts.shape == expected.top_acts.shape == (0, 5)
    assert actual.top_indices.shape == (0, 5) and actual.top_indices.dtype == torch.int64
    assert decoded.shape == (0, 16)


def test_sparsify_revert_and_apply_twice(sparsify):
    host, integration = sparsify
    import sparsify.sparse_coder

    originals = (sparsify.sparse_coder.fused_encoder, sparsify.sparse_coder.decoder_impl, host.SparseCoder.forward)
    integration.apply()
    try:
        assert sparsify.sparse_coder.fused_encoder is not originals[0]
        with pytest.raises(RuntimeError, match="already applied"):
            integration.apply("fused")
    finally:
        integration.revert()
    assert (sparsify.sparse_coder.fused_encoder, sparsify.sparse_coder.decoder_impl,
            host.SparseCoder.forward) == originals
    with pytest.raises(RuntimeError, match="not applied"):
        integration.revert()
    with pytest.raises(ValueError, match="mode"):
        integration.apply("fast")


def assert_refuses(integration, monkeypatch, version, version_match, owner, name, replacement, signature_match):
    """apply() raises HostMismatch for a host version outside the range, and for a replaced function
    whose parameters changed; nothing stays patched."""
    monkeypatch.setattr(pyinterp.integrations._patching, "host_version", lambda _: Version(version))
    with pytest.raises(HostMismatch, match=version_match):
        integration.apply()
    monkeypatch.undo()
    monkeypatch.setattr(owner, name, replacement)
    with pytest.raises(HostMismatch, match=signature_match):
        integration.apply()
    assert not integration.is_applied()


def test_sparsify_refuses_other_versions_and_signatures(sparsify, monkeypatch):
    integration = sparsify[1]
    import sparsify.sparse_coder as sparse_coder

    assert_refuses(integration, monkeypatch, "1.4.1", r"eai-sparsify 1\.4\.1 is outside", sparse_coder,
                   "fused_encoder", lambda input, weight, bias, k: None,
                   r"sparsify\.sparse_coder\.fused_encoder of eai-sparsify 1\.3")


def sparsify_full_step(coder, x, y, dead_mask):
    """The loss sparsify's Trainer backpropagates, with its Multi-TopK term."""
    for p in coder.parameters():
        p.grad = None
    out = coder(x, y, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss + out.multi_topk_fvu / 8).backward()
    return out, grads(coder)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("config", [{"multi_topk": True}, {"skip_connection": True}, {"transcode": True},
                                    {"multi_topk": True, "skip_connection": True}])
def test_sparsify_config_options_match_host(sparsify, mode, config):
    """multi_topk (its 4k loss and the 4k codes it returns), skip_connection, transcode: the patched
    forward against the host's; fused's Multi-TopK gradient also reaches the encoder."""
    host, integration = sparsify
    coder = make_coder(host, **config)
    with torch.no_grad():
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
        if config.get("transcode"):  # sparsify starts a transcoder's decoder at zero
            coder.W_dec.normal_(0, 0.3)
    x = torch.randn(23, 16, dtype=torch.float64) + 0.5
    y = torch.randn(23, 16, dtype=torch.float64) if config.get("transcode") else None
    dead_mask = torch.arange(96) % 4 == 0
    expected, expected_grads = sparsify_full_step(coder, x, y, dead_mask)
    with integration.apply(mode):
        actual, actual_grads = sparsify_full_step(coder, x, y, dead_mask)
    k = 4 * 5 if config.get("multi_topk") else 5
    assert actual.latent_indices.shape == (23, k) and actual.latent_indices.dtype == torch.int64
    torch.testing.assert_close(sorted_codes(actual.latent_acts, actual.latent_indices),
                               sorted_codes(expected.latent_acts, expected.latent_indices))
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), msg=lambda m: f"{name}: {m}")
    assert (float(actual.multi_topk_fvu.detach()) > 0) == bool(config.get("multi_topk"))
    encoder = ("encoder.weight", "encoder.bias", "b_dec")
    assert_grads_close(actual_grads, expected_grads, skip=encoder if mode == "fused" else ())
    if mode == "fused":  # AuxK's and Multi-TopK's gradient reach the encoder
        assert not torch.allclose(actual_grads["encoder.weight"], expected_grads["encoder.weight"])


def test_sparsify_unsupported_config_raises(sparsify):
    host, integration = sparsify
    coder = make_coder(host)
    coder.cfg.activation = "groupmax"
    with integration.apply():
        with pytest.raises(NotImplementedError, match="activation='groupmax'"):
            coder(torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="activation='groupmax'"):
        integration.apply(sae=coder)


def test_sparsify_save_load_through_pyinterp(sparsify, tmp_path):
    host, integration = sparsify
    from pyinterp.nn import TopKSAE

    coder = make_coder(host, dtype=torch.float32)
    x = torch.randn(9, 16)
    with integration.apply():
        coder.save_to_disk(tmp_path / "host")
        expected = coder(x).sae_out
    sae = TopKSAE.load(tmp_path / "host", backend="cpu")
    torch.testing.assert_close(sae(x).x_hat, expected)
    sae.save(tmp_path / "pyinterp")
    torch.testing.assert_close(host.SparseCoder.load_from_disk(tmp_path / "pyinterp")(x).sae_out, expected)


def sparsify_training_run(host, steps, seed=0):
    """sparsify's training step as its Trainer runs it (FVU + AuxK, decoder-gradient projection,
    Adam, renorm; latents dead after `dead_after` tokens unfired); returns the eval FVU."""
    g = torch.Generator().manual_seed(seed)
    width, latents, k, batch = 16, 128, 4, 32
    data = sparse_data(steps * batch + 512, width, 48, 3, g)
    train, held_out = data[:-512], data[-512:]
    coder = make_coder(host, width, latents, k, dtype=torch.float32, seed=seed)
    with torch.no_grad():
        coder.b_dec.copy_(train[:batch].mean(0))
        coder.encoder.bias.zero_()
    optimizer = torch.optim.Adam(coder.parameters(), lr=3e-3)
    since_fired = torch.zeros(latents, dtype=torch.long)
    dead_after = 4 * batch
    for step in range(steps):
        x = train[step * batch:(step + 1) * batch]
        out = coder(x, dead_mask=since_fired > dead_after)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
        since_fired += batch
        since_fired[out.latent_indices.flatten()] = 0
    with torch.no_grad():
        return float(coder(held_out).fvu)


def test_sparsify_training_parity(sparsify):
    host, integration = sparsify
    expected = sparsify_training_run(host, PARITY_STEPS)
    with integration.apply("faithful"):
        actual = sparsify_training_run(host, PARITY_STEPS)
    assert expected < 0.5  # it learned something
    print(f"parity eval FVU host {expected:.6f} faithful {actual:.6f}")
    assert abs(actual - expected) < 1e-3, (actual, expected)


def assert_faithful_parity(run, integration):
    """run() trains from the same seed and batches and returns the held-out FVU: in faithful mode it
    must land within 1e-3 of the unpatched host's."""
    expected = run()
    with integration.apply("faithful"):
        actual = run()
    assert expected < 0.5
    print(f"parity eval FVU host {expected:.6f} faithful {actual:.6f}")
    assert abs(actual - expected) < 1e-3, (actual, expected)


# ---------------------------------------------------------------- dictionary_learning
@pytest.fixture(scope="module")
def dictionary_learning():
    host = pytest.importorskip("dictionary_learning.trainers.top_k",
                               reason="could not import dictionary_learning (pip install -r requirements-peers.txt "
                                      "and --no-deps -r requirements-peers-nodeps.txt)")
    from pyinterp.integrations import dictionary_learning as integration

    integration.undo_nnsight_import_patches()  # else opcheck and torch.compile fail in later tests

    return host, integration


def make_trainer(host, width=16, latents=96, k=5, seed=0, dead_after=None, steps=1000):
    trainer = host.TopKTrainer(steps, width, latents, k, layer=0, lm_name="none", seed=seed, device="cpu",
                               lr=3e-3, warmup_steps=10, threshold_start_step=5)
    with torch.no_grad():
        trainer.ae.encoder.bias.normal_(0, 0.1)
        trainer.ae.b_dec.normal_(0, 0.1)
    if dead_after is not None:
        trainer.dead_feature_threshold = dead_after
    return trainer


def dl_loss_and_grads(trainer, x, step):
    for p in trainer.ae.parameters():
        p.grad = None
    loss = trainer.loss(x, step=step)
    loss.backward()
    return loss, grads(trainer.ae)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("dead", [False, True])
def test_dictionary_learning_loss_grads_match_host(dictionary_learning, mode, dead):
    host, integration = dictionary_learning
    x = torch.randn(33, 16) + 0.5
    since_fired = torch.where(torch.arange(96) % 2 == 0, 100, 0)  # even latents dead before this step
    states = []
    for patched in (False, True):
        trainer = make_trainer(host, dead_after=50 if dead else 10**9)
        trainer.num_tokens_since_fired.copy_(since_fired)
        if patched:
            with integration.apply(mode, trainer=trainer):
                loss, g = dl_loss_and_grads(trainer, x, step=10)
        else:
            loss, g = dl_loss_and_grads(trainer, x, step=10)
        states.append((loss, g, trainer.num_tokens_since_fired.clone(), trainer.dead_features,
                       float(trainer.ae.threshold), trainer.pre_norm_auxk_loss))
    (expected, expected_g, *expected_state), (actual, actual_g, *actual_state) = states
    torch.testing.assert_close(actual_state[0], expected_state[0])
    assert actual_state[1] == expected_state[1] and actual_state[2] == pytest.approx(expected_state[2])
    if mode == "faithful" or not dead:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        assert_grads_close(actual_g, expected_g, rtol=1e-4, atol=1e-6)
    else:
        # fused: the dead mask before this step's firing, so latents reviving now also join AuxK
        assert not torch.allclose(actual, expected)


def test_dictionary_learning_fused_uses_the_mask_before_this_steps_firing(dictionary_learning):
    """fused's documented difference, as such: its loss is the host's with the dead mask taken
    before this step's firing is counted."""
    host, integration = dictionary_learning
    x = torch.randn(33, 16) + 0.5
    since_fired = torch.where(torch.arange(96) % 2 == 0, 100, 0)
    trainer = make_trainer(host, dead_after=50)
    trainer.num_tokens_since_fired.copy_(since_fired)
    with integration.apply("fused", trainer=trainer):
        actual, actual_g = dl_loss_and_grads(trainer, x, step=10)
    reference = make_trainer(host, dead_after=50)
    reference.num_tokens_since_fired.copy_(since_fired)
    dead_before = since_fired >= 50
    # the host's loss with get_auxiliary_loss seeing the pre-step counts
    original = reference.get_auxiliary_loss

    def aux_with_mask_before(residual, post_relu):
        counts = reference.num_tokens_since_fired.clone()
        reference.num_tokens_since_fired.copy_(torch.where(dead_before, 10**9, 0))
        try:
            return original(residual, post_relu)
        finally:
            reference.num_tokens_since_fired.copy_(counts)

    reference.get_auxiliary_loss = aux_with_mask_before
    expected, expected_g = dl_loss_and_grads(reference, x, step=10)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(actual_g, expected_g, rtol=1e-4, atol=1e-6)


def test_dictionary_learning_kernels_run_and_revert(dictionary_learning):
    host, integration = dictionary_learning
    trainer = make_trainer(host, dead_after=50)
    trainer.num_tokens_since_fired.fill_(100)
    x = torch.randn(8, 16)
    assert pyinterp_ops_called(lambda: dl_loss_and_grads(trainer, x, 10)) == set()
    original = host.TopKTrainer.loss
    integration.apply("faithful")
    try:
        ops = pyinterp_ops_called(lambda: dl_loss_and_grads(trainer, x, 10))
        with pytest.raises(RuntimeError, match="already applied"):
            integration.apply()
    finally:
        integration.revert()
    assert {"pyinterp::topk_encode", "pyinterp::sparse_decode"} <= ops, ops
    assert host.TopKTrainer.loss is original
    log = None
    with integration.apply(trainer=trainer):
        log = trainer.loss(x, step=10, logging=True)
    assert log.f.shape == (8, 96) and int((log.f > 0).sum(1).max()) <= 5


def test_dictionary_learning_refuses_other_versions_and_signatures(dictionary_learning, monkeypatch):
    host, integration = dictionary_learning
    assert_refuses(integration, monkeypatch, "0.2.0", r"dictionary-learning 0\.2\.0 is outside", host.TopKTrainer,
                   "get_auxiliary_loss", lambda self, residual, acts, extra: None,
                   r"TopKTrainer\.get_auxiliary_loss of dictionary-learning 0\.1\.0")


def test_dictionary_learning_training_parity(dictionary_learning):
    """The host's own update() (geometric-median init, clipping, Adam, schedule, renorm) for
    PARITY_STEPS steps, latents dead after 4 batches unfired; eval FVU within 1e-3 of the unpatched host."""
    host, integration = dictionary_learning
    g = torch.Generator().manual_seed(0)
    steps, batch = PARITY_STEPS, 32
    data = sparse_data(steps * batch + 512, 16, 48, 3, g)

    def run():
        trainer = make_trainer(host, 16, 128, 4, dead_after=4 * batch, steps=steps)
        for step in range(steps):
            trainer.update(step, data[step * batch:(step + 1) * batch])
        return held_out_fvu(trainer.ae, data[-512:])

    assert_faithful_parity(run, integration)


# ---------------------------------------------------------------- SAELens
@pytest.fixture(scope="module")
def saelens():
    host = pytest.importorskip("sae_lens.saes.topk_sae", reason="could not import sae_lens "
                                                                 "(pip install -r requirements-peers.txt)")
    from sae_lens.saes.sae import TrainStepInput

    from pyinterp.integrations import saelens as integration
    return host, integration, TrainStepInput


def make_saelens(host, width=16, latents=96, k=5, dtype="float64", seed=0, **cfg):
    torch.manual_seed(seed)
    sae = host.TopKTrainingSAE(host.TopKTrainingSAEConfig(d_in=width, d_sae=latents, k=k, dtype=dtype,
                                                          device="cpu", **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(latents, 1, dtype=sae.W_dec.dtype) + 0.5)  # rows of unequal norm
    return sae


def saelens_step(sae, TrainStepInput, x, dead_mask):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead_mask,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out, grads(sae)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("num_dead", [0, 40])
def test_saelens_training_forward_matches_host(saelens, mode, rescale, num_dead):
    host, integration, TrainStepInput = saelens
    sae = make_saelens(host, rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(31, 16, dtype=torch.float64) + 0.5
    dead_mask = torch.arange(96) < num_dead
    expected, expected_grads = saelens_step(sae, TrainStepInput, x, dead_mask)
    with integration.apply(mode):
        actual, actual_grads = saelens_step(sae, TrainStepInput, x, dead_mask)
    assert actual.hidden_pre is None
    assert actual.feature_acts.is_sparse == (mode == "fused")
    torch.testing.assert_close(actual.feature_acts.to_dense(), expected.feature_acts)
    torch.testing.assert_close(actual.sae_out, expected.sae_out)
    torch.testing.assert_close(actual.losses["mse_loss"], expected.losses["mse_loss"])
    assert actual.losses.keys() == expected.losses.keys()
    if mode == "faithful" or num_dead == 0:
        torch.testing.assert_close(actual.loss, expected.loss)
        assert_grads_close(actual_grads, expected_grads)
    if num_dead:
        assert float(expected.losses["auxiliary_reconstruction_loss"].detach()) > 0


def test_saelens_fused_auxk_uses_relu_pre_activations(saelens):
    """fused's documented difference, as such: its AuxK is the host's computed on the ReLU'd
    pre-activations (negative dead latents contribute zero)."""
    host, integration, TrainStepInput = saelens
    sae = make_saelens(host)
    x = torch.randn(31, 16, dtype=torch.float64) + 0.5
    dead_mask = torch.arange(96) % 2 == 0
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    mse = sae.mse_loss_fn(sae_out, x).sum(-1).mean()
    aux = sae.calculate_topk_aux_loss(sae_in=x, sae_out=sae_out, hidden_pre=hidden_pre.relu(),
                                      dead_neuron_mask=dead_mask)
    (mse + aux).backward()
    expected = grads(sae)
    with integration.apply("fused"):
        actual, actual_grads = saelens_step(sae, TrainStepInput, x, dead_mask)
    torch.testing.assert_close(actual.losses["auxiliary_reconstruction_loss"], aux.detach())
    assert_grads_close(actual_grads, expected)


def test_saelens_kernels_run_instance_patch_and_refusals(saelens, monkeypatch):
    host, integration, TrainStepInput = saelens
    sae, other = make_saelens(host, dtype="float32"), make_saelens(host, dtype="float32", seed=1)
    x, dead_mask = torch.randn(8, 16), torch.arange(96) < 40
    with integration.apply("faithful", sae=sae):
        ops = pyinterp_ops_called(lambda: saelens_step(sae, TrainStepInput, x, dead_mask))
        assert pyinterp_ops_called(lambda: saelens_step(other, TrainStepInput, x, dead_mask)) == set()
    assert {"pyinterp::topk_encode", "pyinterp::sparse_decode"} <= ops, ops
    assert "training_forward_pass" not in vars(sae)
    with integration.apply():
        handle = sae.hook_sae_acts_post.register_forward_hook(lambda *a: None)
        with pytest.raises(NotImplementedError, match="hook"):
            saelens_step(sae, TrainStepInput, x, dead_mask)
        handle.remove()
    assert_refuses(integration, monkeypatch, "6.55.0", r"sae-lens 6\.55\.0 is outside", host.TopKTrainingSAE,
                   "calculate_topk_aux_loss", lambda self, sae_in, sae_out, hidden_pre: None,
                   r"TopKTrainingSAE\.calculate_topk_aux_loss of sae-lens 6\.54")


def test_saelens_training_parity(saelens):
    """SAELens' SAETrainer step (forward with AuxK, firing bookkeeping, backward, clipping, Adam) for
    PARITY_STEPS steps, latents dead after 4 steps unfired; eval FVU within 1e-3 of the host's."""
    host, integration, TrainStepInput = saelens
    g = torch.Generator().manual_seed(0)
    steps, batch = PARITY_STEPS, 32
    data = sparse_data(steps * batch + 512, 16, 48, 3, g)

    def run():
        sae = make_saelens(host, 16, 128, 4, dtype="float32")
        optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
        since_fired = torch.zeros(128)
        for step in range(steps):
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=data[step * batch:(step + 1) * batch], coefficients={}, dead_neuron_mask=since_fired > 4,
                n_training_steps=step, is_logging_step=False))
            with torch.no_grad():
                since_fired += 1
                since_fired[out.feature_acts.bool().float().sum(-2).bool().to_dense()] = 0
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return held_out_fvu(sae, data[-512:])

    assert_faithful_parity(run, integration)


# ---------------------------------------------------------------- host SAEs <-> pyinterp.nn
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_topk_saved_loads_into_pyinterp_and_back(saelens, tmp_path, rescale, apply_b_dec_to_input):
    host, integration, _ = saelens
    from sae_lens import SAE

    trained = make_saelens(host, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec_to_input)
    trained.save_inference_model(tmp_path / "host")  # SAELens folds the norms into what it saves
    loaded = SAE.load_from_disk(tmp_path / "host", dtype="float64")
    x = torch.randn(13, 16, dtype=torch.float64) + 0.5
    with torch.no_grad():
        expected_acts, expected_out = loaded.encode(x), loaded(x)
        for source in (loaded, trained):  # the training SAE converts as well, its rescaling folded in
            sae = integration.to_pyinterp(source, backend="cpu")
            values, indices = sae.encode(x)
            dense = torch.zeros_like(expected_acts).scatter(-1, indices.long(), values)
            torch.testing.assert_close(dense, expected_acts)
            torch.testing.assert_close(sae(x).x_hat, expected_out)
        back = integration.from_pyinterp(sae)
        back.save_model(tmp_path / "back")
        torch.testing.assert_close(SAE.load_from_disk(tmp_path / "back", dtype="float64")(x), expected_out)


def dense_codes(values, indices, latents):
    """(N, latents) from sparse codes; added, as threshold_encode's unused slots are (index 0, value 0)."""
    return torch.zeros(*values.shape[:-1], latents, dtype=values.dtype).scatter_add(-1, indices.long(), values)


def assert_same_sae(sae, host_sae, x):
    """pyinterp SAE `sae` has the activations and reconstruction of SAELens' `host_sae` on x."""
    values, indices = sae.encode(x)
    torch.testing.assert_close(dense_codes(values, indices, sae.n_latents), host_sae.encode(x))
    torch.testing.assert_close(sae(x).x_hat, host_sae(x))


def make_saelens_batchtopk(rescale, apply_b_dec_to_input, k=5):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=16, d_sae=96, k=k, dtype="float64", device="cpu", rescale_acts_by_decoder_norm=rescale,
        apply_b_dec_to_input=apply_b_dec_to_input))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(96, 1, dtype=torch.float64) + 0.5)
    sae.topk_threshold = torch.tensor(0.2, dtype=torch.float64)
    return sae


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_batchtopk_loads_into_pyinterp_and_back(saelens, tmp_path, rescale, apply_b_dec_to_input):
    """A BatchTopKTrainingSAE: its training (batch top-k) activations in pyinterp's training mode;
    the JumpReLU SAELens saves it as, in pyinterp's eval mode; back to SAELens as that JumpReLU."""
    from sae_lens import SAE

    from pyinterp.nn import BatchTopKSAE, JumpReLUSAE

    integration = saelens[1]
    trained = make_saelens_batchtopk(rescale, apply_b_dec_to_input)
    x = torch.randn(13, 16, dtype=torch.float64) + 0.5
    sae = integration.to_pyinterp(trained, backend="cpu")
    assert isinstance(sae, BatchTopKSAE) and sae.k == 5 and float(sae.threshold) == pytest.approx(0.2)
    with torch.no_grad():
        training_acts = trained.encode(x)
        assert 0 < int((training_acts > 0).sum()) <= 5 * 13
        values, indices = sae.train().encode(x)
        torch.testing.assert_close(dense_codes(values, indices, 96), training_acts)
        trained.save_inference_model(tmp_path / "host")
        loaded = SAE.load_from_disk(tmp_path / "host", dtype="float64")
        assert loaded.cfg.architecture() == "jumprelu"
        sae = integration.to_pyinterp(trained, backend="cpu").eval()
        assert_same_sae(sae, loaded, x)
        back = integration.from_pyinterp(sae)
        back.save_model(tmp_path / "back")
        assert_same_sae(sae, SAE.load_from_disk(tmp_path / "back", dtype="float64"), x)
        assert isinstance(integration.to_pyinterp(loaded, backend="cpu"), JumpReLUSAE)


def make_saelens_jumprelu(apply_b_dec_to_input=True):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=16, d_sae=96, dtype="float64", device="cpu",
                                                        apply_b_dec_to_input=apply_b_dec_to_input,
                                                        jumprelu_bandwidth=0.01))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.copy_(torch.rand(96) * 0.5)
    return sae


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_jumprelu_saved_loads_into_pyinterp_and_back(saelens, tmp_path, apply_b_dec_to_input):
    from sae_lens import SAE

    from pyinterp.nn import JumpReLUSAE

    integration = saelens[1]
    trained = make_saelens_jumprelu(apply_b_dec_to_input)
    x = torch.randn(13, 16, dtype=torch.float64) + 0.5
    trained.save_inference_model(tmp_path / "host")
    loaded = SAE.load_from_disk(tmp_path / "host", dtype="float64")
    with torch.no_grad():
        assert 0 < int((loaded.encode(x) > 0).sum()) < 13 * 96  # the thresholds cut some latents
        for source in (loaded, trained):
            sae = integration.to_pyinterp(source, backend="cpu").eval()
            assert isinstance(sae, JumpReLUSAE) and sae.max_active == 96
            assert_same_sae(sae, loaded, x)
        assert sae.bandwidth == 0.01  # the training SAE's
        sae.save(tmp_path / "pyinterp")
        assert_same_sae(JumpReLUSAE.load(tmp_path / "pyinterp", backend="cpu").eval(), loaded, x)
        back = integration.from_pyinterp(sae)
        back.save_model(tmp_path / "back")
        assert_same_sae(sae, SAE.load_from_disk(tmp_path / "back", dtype="float64"), x)


def test_saelens_conversion_refuses_what_would_change_activations(saelens):
    host, integration, _ = saelens
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    from pyinterp.nn import BatchTopKSAE, JumpReLUSAE

    with pytest.raises(ValueError, match="'standard'"):
        integration.to_pyinterp(StandardSAE(StandardSAEConfig(d_in=16, d_sae=96, device="cpu")))
    with pytest.raises(ValueError, match="normalize_activations"):
        integration.to_pyinterp(make_saelens(host, normalize_activations="expected_average_only_in"))
    jumprelu = make_saelens_jumprelu()
    with torch.no_grad():
        jumprelu.threshold[3] = -0.1
    with pytest.raises(ValueError, match="1 latents have a negative threshold"):
        integration.to_pyinterp(jumprelu)
    del jumprelu.threshold
    with pytest.raises(ValueError, match="no threshold"):
        integration.to_pyinterp(jumprelu)
    batchtopk = make_saelens_batchtopk(True, True, k=2.5)
    with pytest.raises(ValueError, match=r"k=2\.5 is not a positive integer"):
        integration.to_pyinterp(batchtopk)
    batchtopk = make_saelens_batchtopk(True, True)
    batchtopk.topk_threshold = torch.tensor(0.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="topk_threshold is 0.0"):
        integration.to_pyinterp(batchtopk)
    with pytest.raises(ValueError, match="max_k_per_row=16"):
        integration.from_pyinterp(BatchTopKSAE(16, 96, 4))
    with pytest.raises(ValueError, match="max_active=8"):
        integration.from_pyinterp(JumpReLUSAE(16, 96, 8))


def test_saelens_apply_refuses_batchtopk(saelens):
    """BatchTopKTrainingSAE subclasses TopKTrainingSAE and calls its forward: the patched per-token
    top-k would silently replace its batch top-k."""
    host, integration, TrainStepInput = saelens
    sae = make_saelens_batchtopk(True, True)
    with pytest.raises(NotImplementedError, match="'batchtopk'"):
        integration.apply(sae=sae)
    with integration.apply():
        with pytest.raises(NotImplementedError, match="'batchtopk'"):
            saelens_step(sae, TrainStepInput, torch.randn(4, 16, dtype=torch.float64), None)


def test_dictionary_learning_saved_dictionaries_load_into_pyinterp_and_back(dictionary_learning, tmp_path):
    host, integration = dictionary_learning
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE as HostBatchTopK

    from pyinterp.nn import BatchTopKSAE

    x = torch.randn(13, 16) + 0.5
    topk = make_trainer(host).ae
    batch = HostBatchTopK(16, 96, 5)
    with torch.no_grad():
        batch.encoder.bias.normal_(0, 0.1)
        batch.threshold.fill_(0.05)
    for ae, loader, module in ((topk, host.AutoEncoderTopK.from_pretrained, None),
                               (batch, HostBatchTopK.from_pretrained, BatchTopKSAE)):
        torch.save(ae.state_dict(), tmp_path / "ae.pt")
        loaded = loader(tmp_path / "ae.pt")
        with torch.no_grad():
            expected = loaded(x)
            sae = integration.to_pyinterp(loaded, backend="cpu")
            assert module is None or isinstance(sae, module)
            torch.testing.assert_close(dense_codes(*sae.encode(x), 96), loaded.encode(x))
            torch.testing.assert_close(sae(x).x_hat, expected)
            torch.testing.assert_close(integration.from_pyinterp(sae)(x), expected)
            if module is BatchTopKSAE:  # training mode: the batch's k * N largest, as the host's
                torch.testing.assert_close(dense_codes(*sae.train().encode(x), 96),
                                           loaded.encode(x, use_threshold=False))
    batch.threshold.fill_(-1)  # never set by training
    with pytest.raises(ValueError, match="threshold"):
        integration.to_pyinterp(batch)
    with pytest.raises(ValueError, match="max_k_per_row"):
        integration.from_pyinterp(BatchTopKSAE(16, 96, 4))
    with pytest.raises(ValueError, match="d_model"):
        from pyinterp.integrations._convert import build_pyinterp_sae
        from pyinterp.nn import TopKSAE
        build_pyinterp_sae("test", TopKSAE, torch.zeros(96, 16), torch.zeros(96), torch.zeros(96, 15),
                           torch.zeros(16), 4)


# ---------------------------------------------------------------- bf16 weights and autocast
# FlashAttention-style: the patched and the unpatched host each against a float64 run of the same
# (rounded) weights and batch; pyinterp's error may be at most LOW_PRECISION_FACTOR x the host's
# own, plus one bf16 rounding step (2^-8) for outputs the host happens to get almost exact.
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION = [("bf16", torch.bfloat16, False), ("autocast", torch.float32, True)]


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference).norm() / reference.norm().clamp_min(1e-30))


def assert_low_precision_close(module, x, run, integration, mode, autocast, **apply_kwargs) -> None:
    """run(module, x) -> {name: tensor}: patched and unpatched under autocast (when asked) against
    run on a float64 copy of module and x."""
    import copy

    reference = run(copy.deepcopy(module).double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        host = run(module, x)
        with integration.apply(mode, **apply_kwargs):
            ours = run(module, x)
    assert ours.keys() == host.keys() == reference.keys()
    for name in reference:
        ours_error, host_error = relative_error(ours[name], reference[name]), relative_error(host[name], reference[name])
        print(f"{name}: pyinterp {ours_error:.2e} host {host_error:.2e}")
        assert ours_error <= LOW_PRECISION_FACTOR * host_error + 2**-8, (name, ours_error, host_error)


def outputs_and_grads(module, out: torch.Tensor | None, loss: torch.Tensor) -> dict:
    loss.backward()
    result = {"loss": loss.detach().reshape(1)} | ({} if out is None else {"out": out.detach()})
    for name, p in module.named_parameters():
        if p.grad is not None:
            result[f"grad {name}"] = p.grad.clone()
            p.grad = None
    return result


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("name,dtype,autocast", LOW_PRECISION)
def test_sparsify_low_precision_matches_host(sparsify, mode, name, dtype, autocast):
    host, integration = sparsify
    coder = make_coder(host, 32, 128, 8, dtype=dtype)
    x = (torch.randn(48, 32) + 0.5).to(dtype)
    dead_mask = torch.arange(128) % 3 == 0 if mode == "faithful" else None  # fused: the host's AuxK differs

    def run(module, inputs):
        out = module(inputs, dead_mask=dead_mask)
        return outputs_and_grads(module, out.sae_out, out.fvu + out.auxk_loss)

    assert_low_precision_close(coder, x, run, integration, mode, autocast, sae=coder)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
@pytest.mark.parametrize("name,dtype,autocast", LOW_PRECISION)
def test_saelens_low_precision_matches_host(saelens, mode, name, dtype, autocast):
    host, integration, TrainStepInput = saelens
    sae = make_saelens(host, 32, 128, 8, dtype=str(dtype).removeprefix("torch."))
    x = (torch.randn(48, 32) + 0.5).to(dtype)
    dead_mask = torch.arange(128) % 3 == 0 if mode == "faithful" else None

    def run(module, inputs):
        out = module.training_forward_pass(TrainStepInput(sae_in=inputs, coefficients={}, dead_neuron_mask=dead_mask,
                                                          n_training_steps=0, is_logging_step=False))
        return outputs_and_grads(module, out.sae_out, out.loss)

    assert_low_precision_close(sae, x, run, integration, mode, autocast, sae=sae)


@pytest.mark.parametrize("mode", ["faithful", "fused"])
def test_dictionary_learning_bf16_matches_host(dictionary_learning, mode):
    """dictionary_learning autocasts on GPUs only; on CPU its bf16 path is a bf16 dictionary."""
    host, integration = dictionary_learning
    trainer = make_trainer(host, 32, 128, 8, dead_after=50 if mode == "faithful" else 10**9)
    trainer.ae.to(torch.bfloat16)
    trainer.num_tokens_since_fired.copy_(torch.where(torch.arange(128) % 3 == 0, 100, 0))
    x = (torch.randn(48, 32) + 0.5).to(torch.bfloat16)
    counts = trainer.num_tokens_since_fired.clone()

    def run(ae, inputs):
        trainer.ae = ae
        trainer.num_tokens_since_fired.copy_(counts)
        return outputs_and_grads(ae, None, trainer.loss(inputs, step=1))  # TopKTrainer.loss is what is patched

    assert_low_precision_close(trainer.ae, x, run, integration, mode, False, trainer=trainer)
