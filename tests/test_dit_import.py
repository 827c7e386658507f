"""Warm start from facebookresearch/DiT weights (convert/dit_weights.py, train.init_from).

The reference is a PyTorch DiT written here from the published architecture (timm's
PatchEmbed / Attention / Mlp, DiT's adaLN-Zero blocks and final layer, fixed sin-cos
positions), tiny, with every weight random (adaLN and output included) and the class
embedding of the label used set to zero, so that its conditioning is the timestep alone,
as ours is without audio. Saved with torch.save, imported, and compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from stage2_data import dit_testing_config
from torch import nn

from dithead_jax.config import CONDITION_LANDMARKS, DiTConfig
from dithead_jax.convert import dit_weights
from dithead_jax.training import dit_step, dit_train, loop

DEPTH, WIDTH, HEADS, PATCH, SIZE, CHANNELS, CLASSES, LABEL = 2, 64, 4, 2, 16, 4, 3, 1


def sincos_positions(width: int, grid: int) -> np.ndarray:
    """DiT's table: first half of the features encodes the column, second half the row,
    each [sin | cos] at frequencies 10000^(-k / (width/4))."""

    def encode(pos: np.ndarray, dim: int) -> np.ndarray:
        freq = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        angle = pos.reshape(-1, 1) * freq
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    row, col = np.divmod(np.arange(grid * grid), grid)
    return np.concatenate([encode(col, width // 2), encode(row, width // 2)], axis=1)


class TorchAttention(nn.Module):  # timm's: one fused qkv Linear, heads split (3, H, d)
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TorchMlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TorchBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = TorchAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = TorchMlp(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class TorchDiT(nn.Module):
    """Class-conditional DiT, learn_sigma: (B, c, H, W), t, y -> (B, 2c, H, W)."""

    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(CHANNELS, WIDTH, PATCH, stride=PATCH)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(
            nn.Linear(256, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH)
        )
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, WIDTH)
        table = sincos_positions(WIDTH, SIZE // PATCH)
        self.pos_embed = nn.Parameter(torch.tensor(table, dtype=torch.float32)[None], False)
        self.blocks = nn.ModuleList([TorchBlock(WIDTH, HEADS) for _ in range(DEPTH)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(WIDTH, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(WIDTH, PATCH * PATCH * 2 * CHANNELS)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 2 * WIDTH))

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        angles = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], -1))
        c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        g, p, out = SIZE // PATCH, PATCH, 2 * CHANNELS
        x = x.reshape(-1, g, g, p, p, out).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return x.reshape(-1, out, g * p, g * p)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, path of its saved state_dict)."""
    torch.manual_seed(0)
    model = TorchDiT().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":  # adaLN and output too: nothing starts at zero here
                param.normal_(0.0, 0.3 if param.ndim == 1 else 1.0 / math.sqrt(param.shape[-1]))
        model.y_embedder.embedding_table.weight[LABEL] = 0.0  # c = t, as ours without audio
    path = tmp_path_factory.mktemp("dit") / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def tiny_config(**overrides) -> DiTConfig:
    sizes = dict(input_size=SIZE, patch_size=PATCH, hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS)
    return DiTConfig.testing(**(sizes | overrides))


def test_imported_model_equals_the_torch_dit(reference):
    """Our default 3 latent channels (the file's 4th is dropped, so the reference sees it
    at zero), stacked blocks, and every optional new part switched on."""
    channels = 3
    torch_model, path = reference
    cfg = tiny_config(latent_channels=channels, learn_sigma=True, scan_layers=True,
                      null_audio=True, landmark_tokens=True)  # fmt: skip
    model, imported = dit_weights.load_dit(path, cfg, seed=3)
    assert "blocks/*/attn/qkv/kernel" in imported.loaded
    assert "blocks/*/cross_attn/q/kernel" in imported.new
    assert not any(name.startswith(("context_embedder", "landmark")) for name in imported.loaded)

    rng = np.random.default_rng(1)
    z_t = rng.normal(size=(2, SIZE, SIZE, CHANNELS)).astype(np.float32)
    z_t[..., channels:] = 0.0  # a channel we drop must not reach the reference either
    t = np.array([7, 913])
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(z_t).permute(0, 3, 1, 2), torch.from_numpy(t),
                               torch.full((2,), LABEL)).permute(0, 2, 3, 1).numpy()  # fmt: skip
    # Our z_masked / z_reference slots, audio and landmarks are random: new parts at zero
    # (or weights at zero) must keep them out of the output.
    x = np.concatenate([z_t[..., :channels], rng.normal(size=(2, SIZE, SIZE, 2 * channels))], -1)
    conditions = dict(
        audio=rng.normal(size=(2, cfg.audio_window, cfg.audio_dim)),
        landmarks=rng.uniform(size=(2, len(CONDITION_LANDMARKS), 2)),
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, t, conditions):
        return nnx.merge(graphdef, state)(x, t, **conditions)

    out = np.asarray(forward(state, jnp.asarray(x, jnp.float32), jnp.asarray(t), conditions))
    # Ours: (epsilon, variance) x 3 channels; the file's: (epsilon, variance) x 4.
    theirs = np.concatenate(
        [expected[..., :channels], expected[..., CHANNELS : CHANNELS + channels]], axis=-1
    )
    assert np.abs(theirs).max() > 0.1  # a real signal, not two zero outputs
    np.testing.assert_allclose(out, theirs, atol=2e-5, rtol=0)


def test_training_checkpoint_uses_ema_and_refuses_mismatches(reference, tmp_path, monkeypatch):
    _, path = reference
    monkeypatch.setenv("DITHEAD_WEIGHTS", str(path.parent))  # a bare name is looked up there
    by_name = dit_weights.load_dit_weights(path.name, tiny_config())
    assert by_name.source == str(path)
    assert any("class embedding" in note for note in by_name.notes)
    ema = torch.load(path, weights_only=True)
    model = {k: v + 1.0 for k, v in ema.items()}
    blob = {"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="DiT-custom", image_size=128)}  # fmt: skip
    training = tmp_path / "0001000.pt"
    torch.save(blob, training)
    imported = dit_weights.load_dit_weights(training, tiny_config())
    qkv = imported.params["blocks"][1]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv.reshape(WIDTH, -1), ema["blocks.1.attn.qkv.weight"].T)
    assert any("num_heads is not stored" in note for note in imported.notes)

    def refused(file, cfg, *words):
        with pytest.raises(ValueError) as error:
            dit_weights.load_dit_weights(file, cfg)
        message = str(error.value)
        assert "\n" not in message and str(file) in message
        for word in words:
            assert word in message

    refused(path, tiny_config(depth=3), "depth 2 in the file, 3 here")
    refused(path, tiny_config(input_size=32), "token grid 8 in the file, 16 here")
    refused(path, tiny_config(patch_size=4), "patch_size 2 in the file, 4 here")
    # A named variant fixes the heads (a bare state_dict does not store them).
    torch.save(blob | {"args": argparse.Namespace(model="DiT-S/2")}, training)
    refused(training, tiny_config(), "num_heads 6 in the file's variant, 4 here")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    refused(broken, tiny_config(), "not a loadable PyTorch checkpoint")
    torch.save({k: v for k, v in ema.items() if "mlp.fc2" not in k}, broken)
    refused(broken, tiny_config(), "missing ['blocks.0.mlp.fc2.bias'")


def test_fresh_run_starts_from_the_file_and_a_resume_ignores_it(reference, tmp_path):
    _, path = reference
    file = torch.load(path, weights_only=True)
    config = dit_testing_config("")
    config.train.init_from = str(path)
    for key, value in dict(num_steps=1, log_every=1, checkpoint_every=1, image_every=0,
                           progress="none", async_checkpoints=False).items():  # fmt: skip
        config.train[key] = value
    run = dit_train.DiTRun.from_config(config)
    shapes = dit_train.example_shapes(run.model)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            yield {k: rng.normal(size=(8, *s)).astype(np.float32) for k, s in shapes.items()}

    task = dit_train.build_task(config, workdir=tmp_path, batches=batches(),
                                devices=jax.devices()[:1],  # one device: the quickest compile
                                compiler_options=dit_step.FAST_COMPILE_CPU)  # fmt: skip

    def qkv(params) -> np.ndarray:
        kernel = jax.device_get(params["blocks"][0]["attn"]["qkv"]["kernel"])
        return np.asarray(kernel).reshape(WIDTH, -1)

    file_qkv = file["blocks.0.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(qkv(task.state.params), file_qkv)
    np.testing.assert_array_equal(qkv(task.state.ema_params), file_qkv)
    cross_out = task.state.params["blocks"][0]["cross_attn"]["out"]["kernel"]
    assert not np.asarray(jax.device_get(cross_out)).any()  # new, at its zero init

    result = loop.run(task, run.train, tmp_path)
    assert result.final_step == 1 and np.isfinite(result.losses[1])
    # One Adam step moves each weight by about the learning rate (1e-4), no more.
    moved = np.abs(qkv(result.state.params) - file_qkv)
    assert 0 < moved.max() < 3 * run.train.learning_rate

    # A resumed run neither reads nor needs the file.
    resumed = dataclasses.replace(run, train=dataclasses.replace(run.train, init_from="gone.pt"))
    assert dit_train.warm_start_weights(resumed, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        dit_train.warm_start_weights(resumed, tmp_path / "fresh")


def test_warm_start_keeps_every_parameter_sharded_as_a_fresh_run(reference):
    """On 8 devices with fsdp x tensor: each imported leaf lands with the sharding of the
    fresh state's leaf (a device holds its shard of the file's weights, not all of them)."""
    _, path = reference
    states = {}
    for init_from in ("", str(path)):
        config = dit_testing_config("")
        config.mesh, config.train.init_from = "fsdp_tp", init_from
        run = dit_train.DiTRun.from_config(config)
        shapes = dit_train.example_shapes(run.model)
        batch = {k: np.zeros((8, *s), np.float32) for k, s in shapes.items()}
        task = dit_train.build_task(config, batches=iter([batch]), devices=jax.devices(),
                                    compiler_options=dit_step.FAST_COMPILE_CPU)  # fmt: skip
        states[init_from] = task.state
    fresh, warm = jax.tree.leaves(states[""]), jax.tree.leaves(states[str(path)])
    assert len(fresh) == len(warm) > 100 and jax.device_count() == 8
    for a, b in zip(fresh, warm, strict=True):
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (a.sharding, b.sharding)
    qkv = states[str(path)].params["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv.addressable_shards[0].data.shape == (WIDTH // 4, 3, HEADS // 2, WIDTH // HEADS)
    file = torch.load(path, weights_only=True)["blocks.0.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(np.asarray(qkv).reshape(WIDTH, -1), file)
