"""Exported runs and the Python API: `python -m dithead_jax.export` writes a folder that
still dubs after it is moved and the run, its datasets and its VQGAN runs are gone, with
the faces a load of the workdir makes; loading a workdir reads no optimizer state; a
damaged export fails naming the file.

The run is real but untrained (step-0 checkpoints written by the training library, as
tests/test_multiprocess_eval.py makes them; real stage-1 records and stage-2 latents made
by data/preprocess.py and data/encode_latents.py): what is under test is the plumbing.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from stage2_data import dit_testing_config, load_script, save_initial_dit, save_initial_vqgan

from dithead_jax.config import SyntheticConfig
from dithead_jax.synthetic.dataset import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the testing VQGAN's crops (8 x 8 x 3 latents)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """videos/ (synthetic, with landmark sidecars) and runs/{stage1,vq,latents,dit}."""
    from dithead_jax import runs

    root = tmp_path_factory.mktemp("export")
    videos, tree = root / "videos", root / "runs"
    stage1, vq, latents, dit = (tree / n for n in ("stage1", "vq", "latents", "dit"))
    generate_dataset(SyntheticConfig(identities=2, clips=1, seconds=0.48, size=64, seed=3,
                                     test_fraction=0.5),
                     videos)  # fmt: skip
    preprocess = load_script("preprocess_cli", ROOT / "data/preprocess.py")
    assert preprocess.main(["--input", str(videos), "--out", str(stage1), "--landmarks",
                            "sidecar", "--size", str(SIZE), "--margin", "0.3"]) == 0  # fmt: skip
    save_initial_vqgan(stage1, vq)
    encode = load_script("encode_latents_cli", ROOT / "data/encode_latents.py")
    assert encode.main(["--dataset", str(stage1), "--vqgan", str(vq), "--vqgan-masked",
                        str(vq), "--out", str(latents), "--mask-variants", "1"]) == 0  # fmt: skip
    config = dit_testing_config(latents)
    config.model.input_size, config.model.depth = SIZE // 4, 1
    save_initial_dit(config, dit)
    runs.record_latents(dit, latents)  # what train.py does for a DiT run
    return dict(videos=videos, tree=tree, dit=dit, latents=latents, root=root)


def test_provenance_is_recorded_relative(trained):
    meta = json.loads((trained["latents"] / "dataset" / "metadata.json").read_text())
    assert meta["provenance"]["vqgan_workdir"] == os.path.join("..", "..", "vq")
    assert meta["provenance"]["stage1_dataset"] == os.path.join("..", "..", "stage1")
    recorded = json.loads((trained["dit"] / "provenance.json").read_text())
    assert recorded == {"latents": os.path.join("..", "latents")}


def test_export_moved_without_the_originals_dubs_like_the_workdir(trained, tmp_path):
    from dithead_jax import DiTHeadPipeline, export
    from dithead_jax.data.video_io import iter_frames_at_fps, read_audio, read_video

    video = trained["videos"] / "id000/clip000.mp4"
    speech = trained["videos"] / "id001/clip000.mp4"
    kw = dict(steps=2, seed=1, landmarks="sidecar")
    from_workdir = DiTHeadPipeline.from_pretrained(trained["dit"])(video, speech, **kw)

    assert export.main(["--workdir", str(trained["dit"]), "--out", str(tmp_path / "made")]) == 0
    index = json.loads((tmp_path / "made" / "model_index.json").read_text())
    assert index["audio_features"]["name"] == "logmel" and index["stage1"]["margin"] == 0.3
    assert index["image_size"] == SIZE and not list(tmp_path.glob(".made*"))  # no leftovers
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "made", moved)
    shutil.rmtree(tmp_path / "made")
    gone = trained["root"] / "gone"
    os.rename(trained["tree"], gone)  # the runs and both datasets are no longer there
    try:
        pipe = DiTHeadPipeline.from_pretrained(moved)
        out = pipe(video, speech, **kw)
        np.testing.assert_array_equal(out.faces, from_workdir.faces)
        np.testing.assert_array_equal(out.frames, from_workdir.frames)
        assert out.frames.dtype == np.uint8 and out.frames.shape[1:] == (64, 64, 3)
        # Arrays in: the same frames, speech and landmarks give the same video.
        frames = np.stack(list(iter_frames_at_fps(video, 25)))
        samples, _ = read_audio(speech, 16_000)
        landmarks = np.load(video.with_suffix(".npz"))["landmarks"]
        arrays = pipe(frames, samples, steps=2, seed=1, landmarks=landmarks)
        np.testing.assert_array_equal(arrays.frames, out.frames)
        saved = read_video(arrays.save(tmp_path / "dubbed.mp4"))
        assert saved.frames.shape == out.frames.shape
        assert abs(len(saved.audio) / saved.sample_rate - len(out.frames) / 25) <= 1 / 25
        with pytest.raises(ValueError, match="landmarks array must be"):
            pipe(frames, samples, steps=2, landmarks=landmarks[:3])
        with pytest.raises(FileNotFoundError, match="nothing.wav: not found"):
            pipe(video, tmp_path / "nothing.wav", steps=2)
    finally:
        os.rename(gone, trained["tree"])


READ = """
import sys, tensorstore as ts
from dithead_jax import runs
def read():
    return sum(v.get("value", 0) for m in ts.experimental_collect_matching_metrics(
        "/tensorstore/kvstore/file/bytes_read") for v in m["values"])
"""


def _python(code: str) -> str:
    import subprocess

    result = subprocess.run([sys.executable, "-c", READ + code], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_loading_a_workdir_reads_no_optimizer_state_nor_imports_trainers(trained):
    """In fresh processes: loading the DiT reads its EMA weights alone, well under what
    restoring the whole TrainState (params, EMA, Adam's moments) reads, as TensorStore
    counts the bytes; and loading the whole run imports no trainer."""
    workdir = str(trained["dit"])
    ours, trainers = _python(f"""
runs.load_dit({workdir!r}, runs.run_config({workdir!r}))
dit = read()
from dithead_jax.sampling import load_models
load_models({workdir!r})
print(dit, sorted(m for m in sys.modules if m.startswith("dithead_jax.training")))
""").split(" ", 1)
    assert trainers == "[]"
    full = _python(f"""
from dithead_jax.training import dit_train
import ml_collections
dit_train.load_model({workdir!r}, ml_collections.ConfigDict(runs.run_config({workdir!r})))
print(read())
""")
    # At step 0 the moments are zeros (compressed to little) and params equal the EMA, so
    # the full state reads about twice the EMA weights.
    assert 0 < int(ours) < 0.7 * int(full), (ours, full)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from dithead_jax.export import export

    return export(trained["dit"], tmp_path_factory.mktemp("exp") / "model")


def test_a_damaged_export_fails_naming_the_file(exported, tmp_path, capsys):
    from dithead_jax.commands import sample
    from dithead_jax.sampling import load_models

    broken = tmp_path / "missing"
    shutil.copytree(exported, broken)
    (broken / "dit" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"dit/model\.safetensors: missing"):
        load_models(broken)
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(broken), "--video", __file__, "--audio", __file__,
                     "--out", str(tmp_path / "o.mp4")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(broken / "dit" / "model.safetensors") in err

    reshaped = tmp_path / "reshaped"
    shutil.copytree(exported, reshaped)
    weights = reshaped / "vqgan_masked" / "model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = np.zeros((*tensors[key].shape, 2), tensors[key].dtype)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"vqgan_masked/model\.safetensors: {key} has shape"):
        load_models(reshaped)

    renamed = tmp_path / "renamed"
    shutil.copytree(exported, renamed)
    weights = renamed / "vqgan" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["not.a.param"] = tensors.pop(key)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"vqgan/model\.safetensors: does not match.*not\.a"):
        load_models(renamed)

    bad_config = tmp_path / "config"
    shutil.copytree(exported, bad_config)
    (bad_config / "dit" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"dit/config\.json: not valid JSON"):
        load_models(bad_config)


def test_export_refuses_a_non_empty_out_and_a_missing_workdir(exported, tmp_path, capsys):
    from dithead_jax import export

    for argv, why in (
        (["--workdir", str(exported), "--out", str(exported)], "not empty"),
        (["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope: not found"),
    ):
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and why in err, err


def test_a_local_wav2vec2_checkpoint_travels_with_the_export(exported, tmp_path):
    import types

    from dithead_jax import export
    from dithead_jax.sampling import load_models

    checkpoint = tmp_path / "w2v"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    models = load_models(exported)
    staging = tmp_path / "staging"
    local = types.SimpleNamespace(audio_features=f"wav2vec2:{checkpoint}", dit_run=models.dit_run)
    spec = export._audio_spec(local, staging)
    assert spec["path"] == export.WAV2VEC2_DIR and "reference" not in spec
    assert (staging / export.WAV2VEC2_DIR / "config.json").is_file()
    hub = types.SimpleNamespace(audio_features="wav2vec2:owner/model", dit_run=models.dit_run)
    assert export._audio_spec(hub, staging)["reference"] == "owner/model"

    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    shutil.copytree(staging / "audio", moved / "audio")
    index = json.loads((moved / "model_index.json").read_text())
    index["audio_features"] = spec
    (moved / "model_index.json").write_text(json.dumps(index))
    # Resolved against wherever the folder is now.
    assert load_models(moved).audio_features == f"wav2vec2:{moved / export.WAV2VEC2_DIR}"
