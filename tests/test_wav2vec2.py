"""Parity of our Flax Wav2Vec2ForCTC with transformers' PyTorch model on random tiny configs.

Both published layouts are built: xlsr-53 style (LayerNorm after every conv, pre-LN
transformer, conv bias) and base style (GroupNorm on the first conv, post-LN, no conv bias).
Every parameter is re-randomised, including the weight-norm gain of the positional conv, so
a transposed or misplaced tensor cannot hide behind an identity/zero init.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from dithead_jax.convert.hf_wav2vec2 import (
    Wav2Vec2CheckpointError,
    load_wav2vec2,
    wav2vec2_from_state_dict,
)
from dithead_jax.models.wav2vec2 import (
    Wav2Vec2Config,
    frame_geometry,
    output_frames,
    run_wav2vec2,
)

SR = 16_000
LENGTHS = (SR, SR + 137)  # 1 s, and one that is not a multiple of the 320-sample hop

VARIANTS = {
    # Like wav2vec2-large-xlsr-53: even positional kernel (128 there) -> one frame trimmed.
    "xlsr": dict(
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        num_attention_heads=4,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    ),
    # Like wav2vec2-base; an odd positional kernel covers the no-trim branch.
    "base": dict(
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        conv_bias=False,
        num_attention_heads=2,
        num_conv_pos_embeddings=15,
        num_conv_pos_embedding_groups=2,
    ),
}


def _tiny_torch_model(variant: str, seed: int = 0):
    config = transformers.Wav2Vec2Config(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 24),  # standard kernels/strides, narrow channels
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "original0" in name or "weight_g" in name:
                # HF's init makes g == |v| (weight norm is then the identity); scale it.
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif "original1" in name or "weight_v" in name:
                pass  # keep PyTorch's random direction v
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5)  # unit-variance activations, so logits are O(1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model, config


def _save(model, config, directory, fmt: str) -> None:
    """A checkpoint directory as a user would have it on disk."""
    directory.mkdir()
    config.save_pretrained(directory)
    transformers.Wav2Vec2FeatureExtractor(
        do_normalize=True, return_attention_mask=True
    ).save_pretrained(directory)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file({k: v.numpy() for k, v in state.items()}, str(directory / "model.safetensors"))
    else:
        # transformers 5 only writes safetensors; write the legacy .bin by hand, with the
        # pre-parametrization weight-norm names old checkpoints (xlsr-53-english) carry.
        prefix = "wav2vec2.encoder.pos_conv_embed.conv."
        for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
            state[prefix + old] = state.pop(prefix + "parametrizations.weight." + new)
        torch.save(state, directory / "pytorch_model.bin")


def _waveforms(feature_extractor, n: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(n)
    audio = [0.3 * rng.standard_normal(n).astype(np.float32) for _ in range(batch)]
    values = feature_extractor(audio, sampling_rate=SR, return_tensors="np").input_values
    return values.astype(np.float32)


@pytest.mark.parametrize(
    "variant,fmt", [("xlsr", "safetensors"), ("xlsr", "bin"), ("base", "safetensors")]
)
def test_logits_match_pytorch(tmp_path, variant, fmt):
    torch_model, hf_config = _tiny_torch_model(variant)
    _save(torch_model, hf_config, tmp_path / "ckpt", fmt)
    model, config, feature_extractor = load_wav2vec2(tmp_path / "ckpt")
    assert config == Wav2Vec2Config.from_hf(hf_config)
    assert isinstance(feature_extractor, transformers.Wav2Vec2FeatureExtractor)

    for n in LENGTHS:
        x = _waveforms(feature_extractor, n)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).logits.numpy()
        # Jitted path (what the feature pipeline calls): far quicker here than eager mode,
        # which compiles every op separately; one compile serves .safetensors and .bin.
        got = run_wav2vec2(model, x)
        assert got.shape == expected.shape == (2, output_frames(n, config), 33)
        assert expected.std() > 0.3, "logits too small for the tolerance to mean anything"
        # Measured ~3e-6 on CPU; 2e-5 still catches e.g. a wrong norm epsilon (~9e-5).
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_output_frames_formula():
    config = Wav2Vec2Config()
    for n in (399, 400, 719, 720, SR, SR + 137, 10 * SR + 1):
        assert output_frames(n, config) == max(0, (n - 400) // 320 + 1)
    assert output_frames(SR, config) == 49
    assert frame_geometry(config) == (400, 320)
    hf = transformers.Wav2Vec2Config()  # HF's config object works as well
    assert output_frames(SR + 137, hf) == 50


def test_missing_and_extra_keys_are_named(tmp_path):
    torch_model, hf_config = _tiny_torch_model("base")
    _save(torch_model, hf_config, tmp_path / "ckpt", "safetensors")
    config = Wav2Vec2Config.from_hf(hf_config)
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")

    missing = dict(weights)
    del missing["wav2vec2.encoder.layers.1.attention.k_proj.bias"]
    with pytest.raises(
        Wav2Vec2CheckpointError, match=r"missing.*layers\.1\.attention\.k_proj\.bias"
    ):
        wav2vec2_from_state_dict(missing, config)

    extra = dict(weights, **{"wav2vec2.encoder.adapter.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(
        Wav2Vec2CheckpointError, match=r"unexpected.*wav2vec2\.encoder\.adapter\.weight"
    ):
        wav2vec2_from_state_dict(extra, config)

    wrong = dict(weights)
    wrong["lm_head.weight"] = np.zeros((34, 32), np.float32)
    with pytest.raises(Wav2Vec2CheckpointError, match=r"shape mismatch at lm_head\.kernel"):
        wav2vec2_from_state_dict(wrong, config)

    # Through the file loader too: a config that disagrees with the weights.
    (tmp_path / "ckpt" / "config.json").write_text(
        json.dumps(dict(hf_config.to_dict(), num_hidden_layers=3))
    )
    with pytest.raises(Wav2Vec2CheckpointError, match=r"missing.*layers\.2\."):
        load_wav2vec2(tmp_path / "ckpt")


def test_sharded_safetensors_load_like_one_file(tmp_path):
    torch_model, hf_config = _tiny_torch_model("xlsr")
    _save(torch_model, hf_config, tmp_path / "one", "safetensors")
    _save(torch_model, hf_config, tmp_path / "sharded", "safetensors")
    weights = load_file(tmp_path / "sharded" / "model.safetensors")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(tmp_path / "sharded" / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))

    one = jax.tree.leaves(nnx.state(load_wav2vec2(tmp_path / "one")[0]))
    sharded = jax.tree.leaves(nnx.state(load_wav2vec2(tmp_path / "sharded")[0]))
    assert len(one) == len(sharded)
    for a, b in zip(one, sharded, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub_id = "no-such-user/no-such-wav2vec2"
    with pytest.raises(FileNotFoundError, match=hub_id) as info:
        load_wav2vec2(hub_id)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_wav2vec2(tmp_path / "does" / "not" / "exist")


def test_wav2vec2_audio_features_pair_logits_per_video_frame(tmp_path):
    """The preprocessing path: 50 Hz logits -> one 33-vector per 25 fps frame -> 11x33 windows."""
    from dithead_jax.config import DataConfig
    from dithead_jax.data.audio_features import audio_windows
    from dithead_jax.data.preprocess import AudioFeaturizer

    torch_model, hf_config = _tiny_torch_model("xlsr")
    _save(torch_model, hf_config, tmp_path / "ckpt", "safetensors")
    frames = 25  # one second of video
    audio = 0.3 * np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    featurizer = AudioFeaturizer(f"wav2vec2:{tmp_path / 'ckpt'}", DataConfig())
    per_frame = featurizer(audio, frames)
    assert per_frame.shape == (frames, 33)

    _, _, feature_extractor = load_wav2vec2(tmp_path / "ckpt")
    x = feature_extractor(audio, sampling_rate=SR, return_tensors="np").input_values
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x.astype(np.float32))).logits.numpy()[0]
    assert len(logits) == 49  # floor((16000 - 400) / 320) + 1
    # Logit j is centred at 20 j + 12.5 ms: the pair (2i, 2i+1) lies in video frame i, and
    # the last frame holds only logit 48.
    expected = np.concatenate([logits[:48].reshape(24, 2, 33).mean(1), logits[48:49]])
    np.testing.assert_allclose(per_frame, expected, atol=2e-5)
    assert audio_windows(per_frame).shape == (frames, 11, 33)


def test_chunked_features_match_one_pass(tmp_path):
    """Long audio runs in chunks with 1 s of context each side; the chunked per-frame logits
    must match one pass over the whole clip. They cannot be equal (the feature extractor
    normalises each window and attention spans it), so the bounds come from measurement on
    this tiny model: mean |diff| 0.019, max 0.075, against adjacent frames differing by
    0.18. Reading the logit row one stride late (or centring at the receptive field's end)
    gives mean 0.12 / max 0.85; dropping the context gives max 0.63."""
    from dithead_jax.data.audio_features import wav2vec2_features

    torch_model, hf_config = _tiny_torch_model("xlsr")
    _save(torch_model, hf_config, tmp_path / "ckpt", "safetensors")
    model, config, feature_extractor = load_wav2vec2(tmp_path / "ckpt")
    audio = 0.3 * np.random.default_rng(1).standard_normal(4 * SR).astype(np.float32)
    args = (audio, SR, 100, 25, model, config, feature_extractor)
    whole = wav2vec2_features(*args, chunk_seconds=30.0)
    chunked = wav2vec2_features(*args, chunk_seconds=1.0)
    assert whole.shape == chunked.shape == (100, 33)
    diff = np.abs(whole - chunked)
    assert diff.mean() < 0.04 and diff.max() < 0.2, (diff.mean(), diff.max())
