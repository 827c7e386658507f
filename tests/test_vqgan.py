"""VQGAN model: shapes, quantiser maths, dead codes, and parity with a PyTorch reference
of the CompVis layout loaded through the checkpoint importer. (Losses and a short training
run: test_vqgan_training.py.)"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from dithead_jax import sharding
from dithead_jax.config import VQGANConfig
from dithead_jax.convert import compvis_vqgan
from dithead_jax.models import vqgan as vq
from dithead_jax.models.layers import count_params
from dithead_jax.models.vqgan import VQGAN

nn, F = torch.nn, torch.nn.functional


def fast_rngs(seed: int) -> nnx.Rngs:
    """XLA's RngBitGenerator instead of threefry: the first eager init of a model with ~70
    differently shaped parameters compiles one threefry program per shape (~25 s of CPU
    here), rbg takes a fifth of that. The init code itself is the same."""
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


# ---------------------------------------------------------------------------------------
# A small PyTorch reference of the CompVis VQModel (written from its equations; attribute
# names are chosen so that state_dict() yields the real checkpoint keys).


def t_norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class TResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, g: int):
        super().__init__()
        self.norm1, self.conv1 = t_norm(cin, g), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = t_norm(cout, g), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttnBlock(nn.Module):
    def __init__(self, c: int, g: int):
        super().__init__()
        self.norm = t_norm(c, g)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2) for m in (self.q, self.k, self.v))  # (b, c, L)
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class TResample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom only
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TMid(nn.Module):
    def __init__(self, c: int, g: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = (
            TResnetBlock(c, c, g),
            TAttnBlock(c, g),
            TResnetBlock(c, c, g),
        )

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def t_level(blocks, attns, resample, kind):
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, kind, resample)
    return level


def run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    for name in ("downsample", "upsample"):
        if hasattr(level, name):
            h = getattr(level, name)(h)
    return h


class TVQModel(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g, ch, n = cfg.norm_groups, cfg.ch, len(cfg.ch_mult)
        attn = lambda i: cfg.resolution // 2**i in cfg.attn_resolutions
        enc, c = nn.Module(), ch
        enc.conv_in, levels = nn.Conv2d(cfg.in_channels, ch, 3, padding=1), []
        for i, m in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(TResnetBlock(c, ch * m, g))
                c = ch * m
                if attn(i):
                    attns.append(TAttnBlock(c, g))
            levels.append(
                t_level(blocks, attns, TResample(c, True) if i < n - 1 else None, "downsample")
            )
        enc.down, enc.mid = nn.ModuleList(levels), TMid(c, g)
        enc.norm_out, enc.conv_out = t_norm(c, g), nn.Conv2d(c, cfg.z_channels, 3, padding=1)
        dec = nn.Module()
        dec.conv_in, dec.mid = nn.Conv2d(cfg.z_channels, c, 3, padding=1), TMid(c, g)
        levels = []
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(TResnetBlock(c, ch * cfg.ch_mult[i], g))
                c = ch * cfg.ch_mult[i]
                if attn(i):
                    attns.append(TAttnBlock(c, g))
            levels.insert(0, t_level(blocks, attns, TResample(c, False) if i else None, "upsample"))
        dec.up = nn.ModuleList(levels)
        dec.norm_out, dec.conv_out = t_norm(c, g), nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for level in e.down:
            h = run_level(level, h)
        return self.quant_conv(e.conv_out(swish(e.norm_out(e.mid(h)))))

    def quant(self, z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat, self.quantize.embedding.weight).argmin(dim=1)
        q = self.quantize.embedding(idx).reshape(z.shape[0], z.shape[2], z.shape[3], -1)
        return q.permute(0, 3, 1, 2), idx.reshape(z.shape[0], z.shape[2], z.shape[3])

    def decode(self, z):
        d = self.decoder
        h = d.mid(d.conv_in(self.post_quant_conv(self.quant(z)[0])))
        for level in reversed(d.up):
            h = run_level(level, h)
        return d.conv_out(swish(d.norm_out(h)))


PARITY_CFG = VQGANConfig(
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    norm_groups=8,
    resolution=16,
    attn_resolutions=(8,),
    codebook_size=32,
)


def random_torch_vqmodel(cfg: VQGANConfig, seed: int = 0) -> TVQModel:
    torch.manual_seed(seed)
    model = TVQModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm defaults (1, 0) would hide a scale/bias swap
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        model.quantize.embedding.weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory):
    """(torch reference, our VQGAN imported from its saved `model.ckpt`, checkpoint path)."""
    ref = random_torch_vqmodel(PARITY_CFG)
    state = dict(ref.state_dict())
    # What real LDM checkpoints also carry and the importer must skip.
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    path = tmp_path_factory.mktemp("ldm") / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    ours = compvis_vqgan.load_compvis_vqgan(path, base=VQGANConfig(norm_groups=8, resolution=16))
    return ref, ours, path


def test_import_infers_the_architecture(parity_models):
    _, ours, _ = parity_models
    assert ours.config == PARITY_CFG


def test_parity_with_pytorch_reference(parity_models):
    ref, ours, _ = parity_models
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        z_ref = ref.encode(xt)
        _, idx_ref = ref.quant(z_ref)
        rec_ref = ref.decode(z_ref).permute(0, 2, 3, 1).numpy()
    z_ref = z_ref.permute(0, 2, 3, 1).numpy()

    z = jax.jit(lambda m, x: m.encode(x))(ours, x)
    rec, report, z_fwd = jax.jit(lambda m, x: m(x))(ours, x)
    decoded = jax.jit(lambda m, z: m.decode(z))(ours, z_ref)
    np.testing.assert_allclose(z, z_ref, atol=1e-4)
    np.testing.assert_array_equal(report.indices, idx_ref.numpy())
    np.testing.assert_allclose(decoded, rec_ref, atol=1e-4)  # decode quantises first
    np.testing.assert_allclose(rec, rec_ref, atol=1e-4)
    np.testing.assert_allclose(z_fwd, z, atol=1e-6)
    print(
        "parity max|diff|: encode", np.abs(z - z_ref).max(), "forward", np.abs(rec - rec_ref).max()
    )


def test_import_is_strict(parity_models):
    ref, _, _ = parity_models
    state = dict(ref.state_dict())
    missing = dict(state)
    del missing["decoder.up.1.attn.0.proj_out.bias"]
    with pytest.raises(KeyError, match=r"decoder\.up\.1\.attn\.0\.proj_out\.bias"):
        compvis_vqgan.vqgan_from_state_dict(missing, PARITY_CFG)
    extra = dict(state, **{"quantize.used": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"unexpected \(1\): \['quantize\.used'\]"):
        compvis_vqgan.vqgan_from_state_dict(extra, PARITY_CFG)
    with pytest.raises(ValueError, match="shape mismatch"):
        compvis_vqgan.vqgan_from_state_dict(state, dataclasses.replace(PARITY_CFG, embed_dim=4))


def test_real_config_shapes_and_size():
    f4 = VQGANConfig.f4_16384()
    model = nnx.eval_shape(lambda: VQGAN(f4, rngs=nnx.Rngs(0)))
    n = count_params(model)
    # LDM's vq-f4 (8192 codes) has ~55.3M parameters; 8192 more 3-d codes add 24.6k.
    assert 55.0e6 < n < 55.7e6, n
    z = nnx.eval_shape(
        lambda m, x: m.encode(x), model, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    )
    assert z.shape == (1, 64, 64, 3)
    f8 = nnx.eval_shape(lambda: VQGAN(VQGANConfig.f8_16384(), rngs=nnx.Rngs(0)))
    z8 = nnx.eval_shape(
        lambda m, x: m.encode(x), f8, jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    )
    assert z8.shape == (1, 64, 64, 3)
    print(f"params: f4_16384 {n:,}  f8_16384 {count_params(f8):,}")


def test_logical_axis_names():
    model = nnx.eval_shape(lambda: VQGAN(VQGANConfig.testing(), rngs=nnx.Rngs(0)))
    names = {
        path: var.get_metadata().get("out_sharding")
        for path, var in nnx.state(model, nnx.Param).flat_state()
    }
    assert names[("quantize", "codebook")] == ("codebook", "codebook_dim")
    assert names[("encoder", "conv_in", "kernel")] == (None, None, "conv_in", "conv_out")
    assert names[("decoder", "mid", "attn_1", "q", "bias")] == ("conv_out",)
    assert names[("encoder", "down", 0, "block", 0, "norm1", "scale")] == ("norm",)
    assert all(n is not None for n in names.values())


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, 8 images, jitted forward) of the testing VQGAN, shared so the
    forward pass compiles once."""
    graphdef, params = nnx.split(VQGAN(VQGANConfig.testing(), rngs=fast_rngs(0)), nnx.Param)
    x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3), minval=-1, maxval=1)
    return graphdef, params, x, jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))


def test_sharded_forward_matches_single_device(tiny):
    """VQGAN_RULES on an 8-device fsdp mesh: golden specs, and a forward pass with the
    batch and the weights split equals the unsharded one."""
    _, params, x, forward = tiny
    mesh = sharding.make_mesh("fsdp")
    specs = sharding.tree_specs(params, sharding.VQGAN_RULES, mesh)
    whole = P(None, None, None, None)
    assert specs["encoder"]["conv_in"]["kernel"].get_value() == P(None, None, None, "fsdp")
    assert specs["decoder"]["conv_out"]["kernel"].get_value() == whole  # 3 outputs
    assert specs["quantize"]["codebook"].get_value() == P(None, None)
    rec, report, _ = forward(params, x)
    shardings = sharding.tree_shardings(params, sharding.VQGAN_RULES, mesh)
    batch = sharding.batch_sharding(sharding.VQGAN_RULES, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.VQGAN_RULES):
        params_s, x_s = jax.device_put((params, x), (shardings, batch))
        compiled = forward.lower(params_s, x_s).compile()
        rec_s, report_s, _ = compiled(params_s, x_s)
    # Activations stay split by batch (`vqgan.constrain`): weights are all-gathered, feature
    # maps are never resharded or gathered.
    hlo = compiled.as_text()
    assert " all-to-all(" not in hlo
    assert not re.search(r"= f32\[8,[\d,]+\]\{[\d,]*\} all-gather\(", hlo)  # (B, ...) gathers
    assert rec_s.sharding.spec == P("fsdp")
    np.testing.assert_allclose(rec_s, rec, atol=1e-5)
    np.testing.assert_array_equal(report_s.indices, report.indices)


# ---------------------------------------------------------------------------------------
# Quantiser


def toy_quantizer(codebook: np.ndarray, beta: float = 0.25) -> vq.VectorQuantizer:
    q = vq.VectorQuantizer(*codebook.shape, beta, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    q.codebook.set_value(jnp.asarray(codebook))
    return q


def test_nearest_codes_chunked_matches_direct():
    rng = np.random.default_rng(1)
    z, book = rng.normal(size=(2, 7, 5, 3)), rng.normal(size=(50, 3))
    direct = np.argmin(((z[..., None, :] - book) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(vq.nearest_codes(z, book), direct)
    np.testing.assert_array_equal(vq.nearest_codes(z, book, max_elements=2 * 5 * 50 * 3), direct)


def test_commitment_beta_and_straight_through_gradients():
    """Analytic gradients on a toy: codebook term pulls e with weight 1, commitment term
    pulls z with weight beta (taming's legacy quantiser has them the other way round)."""
    beta = 0.25
    book = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    z = np.array([[[[0.1, 0.2, -0.1], [0.9, 1.2, 0.8]]]], np.float32)  # (1, 1, 2, 3)
    q = toy_quantizer(book, beta)
    graphdef, params = nnx.split(q)

    def loss(params, z):
        return nnx.merge(graphdef, params)(z)[1].loss

    g_params, g_z = jax.grad(loss, argnums=(0, 1))(params, z)
    e = book[[0, 1]][None, None]  # nearest codes: 0 and 1
    n = z.size
    np.testing.assert_allclose(g_z, 2 * beta * (z - e) / n, rtol=1e-5, atol=1e-7)
    g_book = np.stack([2 * (book[k] - z[0, 0, k]) / n for k in range(2)])
    np.testing.assert_allclose(g_params["codebook"][...], g_book, rtol=1e-5, atol=1e-7)

    # Straight-through: the quantised output passes d/dz = identity and nothing to e.
    out_grad = jax.grad(lambda p, z: jnp.sum(nnx.merge(graphdef, p)(z)[0] * 3.0), argnums=(0, 1))
    g_params, g_z = out_grad(params, z)
    np.testing.assert_allclose(g_z, np.full_like(z, 3.0))
    np.testing.assert_allclose(g_params["codebook"][...], 0.0)


def test_usage_stats():
    counts = vq.code_counts(jnp.array([[0, 0], [1, 1]]), 8)
    np.testing.assert_array_equal(counts, [2, 2, 0, 0, 0, 0, 0, 0])
    perplexity, usage = vq.usage_stats(counts)
    np.testing.assert_allclose([perplexity, usage], [2.0, 0.25], rtol=1e-6)
    perplexity, usage = vq.usage_stats(jnp.ones(16, jnp.int32))
    np.testing.assert_allclose([perplexity, usage], [16.0, 1.0], rtol=1e-5)


def test_dead_code_reset():
    book = jnp.arange(12.0).reshape(4, 3)
    latents = jnp.full((2, 2, 2, 3), -5.0) + jnp.arange(8.0).reshape(2, 2, 2, 1)
    age = jnp.array([0, 5, 2, 9])
    new, new_age, n = vq.reset_dead_codes(book, age, latents, jax.random.key(0), max_age=5)
    assert int(n) == 2
    live = np.asarray([0, 2])
    np.testing.assert_array_equal(np.asarray(new)[live], np.asarray(book)[live])  # untouched
    flat = np.asarray(latents).reshape(-1, 3)
    for k in (1, 3):  # dead codes now sit on some latent of the batch
        assert np.any(np.all(flat == np.asarray(new[k]), axis=1))
    np.testing.assert_array_equal(new_age, [0, 0, 2, 0])
    # refresh: codes used in this batch get age 0, the rest age by one.
    _, aged, n = vq.refresh_codebook(
        book, age, jnp.array([[2, 2]]), latents, jax.random.key(1), 100
    )
    np.testing.assert_array_equal(aged, [1, 6, 0, 10])
    assert int(n) == 0


def test_round_trip_and_encoder_gradient(tiny):
    graphdef, params, x, forward = tiny
    rec, report, z = forward(params, x)

    @jax.jit
    def run(params, x, indices):
        m = nnx.merge(graphdef, params)
        # The straight-through estimator lets a reconstruction loss reach the encoder.
        grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x)[0] ** 2))(params)
        return m.decode(m.encode(x)), m.decode_code(indices), grads

    round_trip, from_codes, grads = run(params, x, report.indices)
    assert z.shape == (8, 8, 8, 3) and report.indices.shape == (8, 8, 8)
    assert rec.shape == x.shape
    np.testing.assert_allclose(round_trip, rec, atol=1e-5)
    np.testing.assert_allclose(from_codes, rec, atol=1e-5)

    enc_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["encoder"]))
    assert np.isfinite(enc_norm) and enc_norm > 0
    assert float(jnp.abs(grads["quantize"]["codebook"][...]).max()) == 0.0
