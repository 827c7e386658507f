"""Typed, frozen configuration that reaches the library code.

`ml_collections` configs stay at the command line (see `configs/`); entry points turn them
into these dataclasses with `from_dict`, so modules never see a mutable, stringly-typed dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# iBUG-68 landmark indices (0-based) used throughout the project.
JAW = tuple(range(0, 17))
RIGHT_BROW = tuple(range(17, 22))
LEFT_BROW = tuple(range(22, 27))
NOSE_BRIDGE = tuple(range(27, 31))
NOSE_BOTTOM = tuple(range(31, 36))
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
OUTER_LIPS = tuple(range(48, 60))
INNER_LIPS = tuple(range(60, 68))
# DESIGN.md decision: hull of jaw points 1-15 and the nose-bottom point 33, so that the
# mask outline follows the jaw and never the lips (a lip-shaped outline leaks the answer).
LOWER_FACE_HULL = tuple(range(1, 16)) + (33,)
# DiffTalk's landmark condition (its data loader: points 0-3 and 13-47): the face outline
# above the chin, brows, nose and eyes; the chin (4-12) and lips (48-67) are left out so
# the condition cannot tell how far the mouth is open.
CONDITION_LANDMARKS = tuple(range(0, 4)) + tuple(range(13, 48))


class ConfigError(ValueError):
    """An impossible config value; `str()` is one line naming the field and what to change.

    `path` is the field's dotted name inside the run config once `from_dict` knows it
    (`model.depth`), else the dataclass's (`DiTConfig.depth`).
    """

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}")

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.path.split('.', 1)[-1]}", self.problem)


def from_dict(cls: type[T], values: dict[str, Any] | Any, path: str = "") -> T:
    """Builds a (possibly nested) config dataclass from a dict or `ConfigDict`.

    Unknown keys are an error so that a typo on the command line cannot pass silently.
    `path` (e.g. "config.model") names the fields in validation errors.
    """
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{path or cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        field_type = fields[name].type
        nested = _DATACLASSES.get(field_type) if isinstance(field_type, str) else None
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{path}.{name}" if path else "")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if not path or not e.path.startswith(cls.__name__ + "."):
            raise
        raise e.under(path) from None


def _check(instance: Any, name: str, ok: bool, problem: str) -> None:
    if not ok:
        value = getattr(instance, name)
        raise ConfigError(f"{type(instance).__name__}.{name}", f"{problem} (got {value!r})")


def _positive(instance: Any, *names: str) -> None:
    for name in names:
        value = getattr(instance, name)
        _check(instance, name, isinstance(value, int | float) and value > 0, "must be > 0")


def _non_negative(instance: Any, *names: str) -> None:
    for name in names:
        value = getattr(instance, name)
        _check(instance, name, isinstance(value, int | float) and value >= 0, "must be >= 0")


def to_dict(instance: Any) -> dict[str, Any]:
    """A config dataclass's fields, for ml_collections run configs. Tuples stay tuples:
    ml_collections overrides those from the command line (`--config.model.ch_mult='(1,2)'`)
    but not lists; JSON turns them into lists, which `from_dict` reads back."""
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a frame, its mask and its audio window look like, and where the records are."""

    dir: str = ""
    image_size: int = 256
    fps: int = 25
    sample_rate: int = 16_000
    # Audio window of DiT-Head: 11 frames (i-5 .. i+5) of a 33-dim feature = 363 dims.
    audio_window: int = 11
    audio_dim: int = 33
    # Gaussian alpha-blend of the mask edge; the paper's 27x27, sigma 5 at 256 px.
    mask_blur_kernel: int = 27
    mask_blur_sigma: float = 5.0
    mask_hull: tuple[int, ...] = LOWER_FACE_HULL
    mask_fill: float = 0.0
    # Reference frame at least this many frames from the target (paper: 60).
    min_reference_distance: int = 60

    def __post_init__(self) -> None:
        _positive(self, "image_size", "fps", "sample_rate", "audio_window", "audio_dim")
        _positive(self, "mask_blur_kernel", "mask_blur_sigma")
        _non_negative(self, "min_reference_distance")

    @property
    def audio_features(self) -> int:
        return self.audio_window * self.audio_dim


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic talking faces (data/synthetic.py)."""

    identities: int = 4
    clips: int = 2
    seconds: float = 4.0
    size: int = 256
    seed: int = 0
    fps: int = 25
    sample_rate: int = 16_000
    test_fraction: float = 0.25


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """DiT-Head denoiser. Named sizes follow facebookresearch/DiT (S/B/L/XL x patch 2/4/8)."""

    input_size: int = 64  # latent height = width
    patch_size: int = 2
    latent_channels: int = 3  # z_t; the input is [z_t, z_masked, z_reference] = 3x this
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    audio_window: int = 11
    audio_dim: int = 33
    # "audio_tokens": 11 audio tokens + 1 timestep token as cross-attention keys (our
    # decision); "single_token": the paper's literal channel concat -> one key (ablation).
    context_layout: Literal["audio_tokens", "single_token"] = "audio_tokens"
    # False: no cross-attention and no audio embedder, i.e. a plain DiT that ignores audio
    # (the "before cross-attention" model whose size DESIGN.md quotes; an ablation).
    cross_attention: bool = True
    # A learned null audio context (`DiT.null_audio`, the embedded audio's shape) that
    # replaces the audio of examples flagged `drop_audio`: what classifier-free guidance on
    # audio needs (train with DiffusionConfig.audio_dropout > 0). Off: the paper's params.
    null_audio: bool = False
    # DiffTalk's temporal audio filter: a pre-LN residual self-attention over the window of
    # audio tokens before they serve as cross-attention keys (zero-initialised output, so a
    # fresh model equals the unfiltered one). "audio_tokens" layout only.
    audio_filter: bool = False
    # DiffTalk's landmark condition: the target frame's CONDITION_LANDMARKS (crop coordinates
    # / image size) through a 2-layer MLP into one extra cross-attention token after the
    # audio context; never dropped by classifier-free guidance. Needs stage-2 records with
    # landmarks (data/encode_latents.py writes them).
    landmark_tokens: bool = False
    learn_sigma: bool = False
    # None | "auto" | "xla" | "cudnn" | "splash" | "blockwise" (layers.resolve_attention):
    # "auto" is cuDNN flash attention on GPU in bf16, the Pallas splash kernel on TPU, XLA
    # elsewhere; "blockwise" is the pure-JAX flash-style attention with a custom VJP (no
    # (L, L) scores in either pass; the fastest self-attention on CPU, any dtype/backend).
    attention_impl: str | None = None
    remat_policy: str = "none"  # "none" | "full" | "dots_saveable" | ...
    scan_layers: bool = False
    dtype: str = "float32"  # compute dtype; params stay float32
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive(self, "input_size", "patch_size", "latent_channels", "hidden_size", "depth")
        _positive(self, "num_heads", "mlp_ratio", "audio_window", "audio_dim")
        _check(self, "hidden_size", self.hidden_size % self.num_heads == 0,
               f"must be a multiple of num_heads={self.num_heads}")  # fmt: skip
        _check(self, "patch_size", self.input_size % self.patch_size == 0,
               f"must divide input_size={self.input_size}")  # fmt: skip
        _check(self, "context_layout", self.context_layout in ("audio_tokens", "single_token"),
               "must be 'audio_tokens' or 'single_token'")  # fmt: skip
        _check(self, "audio_filter",
               not self.audio_filter or (self.cross_attention
                                         and self.context_layout == "audio_tokens"),
               "needs cross_attention and context_layout='audio_tokens' (it filters the "
               "window of audio tokens)")  # fmt: skip
        _check(self, "null_audio", not self.null_audio or self.cross_attention,
               "needs cross_attention (without it the DiT ignores audio)")  # fmt: skip
        _check(self, "landmark_tokens", not self.landmark_tokens or self.cross_attention,
               "needs cross_attention (the landmarks are a cross-attention token)")  # fmt: skip

    @classmethod
    def named(cls, name: str, **overrides: Any) -> DiTConfig:
        """`DiTConfig.named("L_2")` etc.; sizes as in the DiT paper."""
        size, patch = name.split("_")
        depth, hidden, heads = _DIT_SIZES[size]
        return cls(
            depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), **overrides
        )

    @classmethod
    def S_2(cls, **kw: Any) -> DiTConfig:
        return cls.named("S_2", **kw)

    @classmethod
    def B_2(cls, **kw: Any) -> DiTConfig:
        return cls.named("B_2", **kw)

    @classmethod
    def L_2(cls, **kw: Any) -> DiTConfig:
        return cls.named("L_2", **kw)

    @classmethod
    def XL_2(cls, **kw: Any) -> DiTConfig:
        return cls.named("XL_2", **kw)

    @classmethod
    def testing(cls, **kw: Any) -> DiTConfig:
        """A tiny DiT for tests and the CPU demo."""
        base = dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4)
        return cls(**(base | kw))


# depth, hidden size, heads
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and objective. Defaults are ADM's (the paper: "ADM hyperparameters")."""

    num_timesteps: int = 1000
    schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Literal["epsilon", "v"] = "epsilon"
    # Extra MSE weight inside the lower-face mask (stage-2 records carry it on the latent
    # grid): weights 1 + mask_weight * alpha, normalised to mean 1. The masked region is
    # the only part the DiT must invent from audio; elsewhere z_masked already shows the
    # answer, and a short run otherwise spends itself there (0 = the paper's plain MSE).
    mask_weight: float = 0.0
    # Classifier-free guidance on audio: the probability that an example's audio is replaced
    # by the DiT's learned null context in a training step (needs DiTConfig.null_audio).
    audio_dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "num_timesteps", "beta_start", "beta_end")
        _check(self, "audio_dropout", isinstance(self.audio_dropout, int | float)
               and 0 <= self.audio_dropout < 1, "must lie in [0, 1)")  # fmt: skip
        _check(self, "beta_end", self.beta_start < self.beta_end < 1,
               f"must lie in (beta_start={self.beta_start}, 1)")  # fmt: skip
        _non_negative(self, "mask_weight")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 = all remaining devices.

    Multi-slice (TPU slices joined by the data-centre network, or GPU hosts whose own
    links are much faster than the network between them): `dcn_*` > 1 splits that axis
    across slices as well. `data`, `fsdp`, `tensor` are then sizes *within* one slice
    (ICI; the -1 resolves against one slice's devices) and each mesh axis is ici x dcn
    large: `fsdp=-1, dcn_data=2` is FSDP inside each slice, data parallel across two.
    Put data parallelism on DCN: it crosses the slow link once per step (the gradient
    reduction); FSDP's per-layer all-gathers belong on ICI.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp

    @classmethod
    def preset(cls, name: str) -> MeshConfig:
        """`dp`: pure data parallel; `fsdp`: parameters sharded over all devices;
        `fsdp_tp`: FSDP with 2-way tensor parallelism inside each group."""
        presets = {
            "dp": cls(data=-1, fsdp=1, tensor=1),
            "fsdp": cls(data=1, fsdp=-1, tensor=1),
            "fsdp_tp": cls(data=1, fsdp=-1, tensor=2),
        }
        if name not in presets:
            raise ValueError(f"unknown mesh preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping shared by both training stages."""

    seed: int = 0
    global_batch_size: int = 256
    num_steps: int = 400_000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # After warm-up: "constant" (the paper's), or "cosine" down to 0 at num_steps. Short
    # runs (the CPU demo) end far better annealed: the last steps average out the noise of
    # a high constant rate instead of stopping in it.
    lr_decay: Literal["constant", "cosine"] = "constant"
    grad_clip_norm: float | None = None
    ema_decay: float = 0.9999
    # min(ema_decay, (1 + t) / (10 + t)) at update t (LDM's LitEma): for short runs.
    ema_warmup: bool = False
    log_every: int = 100
    image_every: int = 5_000
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Examples shown in the periodic image grid (denoised previews of one fixed batch).
    preview_count: int = 8
    # Peak dense TFLOP/s of one device for the MFU estimate; 0 = look the device kind up
    # (TPU/GPU table in training/metrics.py) or, on CPU, time a GEMM at start-up.
    peak_tflops: float = 0.0
    # "auto": a tqdm bar when stderr is a terminal; "bar"; "none".
    progress: str = "auto"
    # Stage 2 only: a facebookresearch/DiT checkpoint (.pt) whose weights start a fresh run
    # (convert/dit_weights.py); "" = random init. A resumed run keeps its checkpoint's.
    init_from: str = ""

    def __post_init__(self) -> None:
        _positive(self, "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
        _non_negative(self, "num_steps", "learning_rate", "weight_decay", "warmup_steps")
        _non_negative(self, "image_every", "preview_count", "peak_tflops")
        _check(self, "ema_decay", 0 <= self.ema_decay <= 1, "must lie in [0, 1]")
        _check(self, "grad_clip_norm", self.grad_clip_norm is None or self.grad_clip_norm > 0,
               "must be > 0 or None")  # fmt: skip
        _check(self, "lr_decay", self.lr_decay in ("constant", "cosine"),
               "must be 'constant' or 'cosine'")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Stage-1 VQGAN (models/vqgan.py), CompVis LDM layout; names follow its `ddconfig`.

    Downsampling factor f = 2 ** (len(ch_mult) - 1): f4 maps 256^2 frames to 64x64x3
    latents, f8 maps 512^2 frames to the same 64x64x3 (so one DiT serves both).
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    # Attention after the res blocks of every level whose feature-map size (for inputs of
    # `resolution` pixels) is listed, as CompVis's `attn_resolutions`; () = none (vq-f4).
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True  # the middle block's self-attention (always on in CompVis)
    norm_groups: int = 32
    dropout: float = 0.0  # kept for config parity with CompVis; only 0 is implemented
    z_channels: int = 3
    embed_dim: int = 3
    codebook_size: int = 16_384
    # Weight of the commitment term ||z - sg(e)||^2 (the codebook term has weight 1).
    commitment_beta: float = 0.25
    dtype: str = "float32"  # compute dtype; params stay float32
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive(self, "in_channels", "out_channels", "ch", "num_res_blocks", "resolution")
        _positive(self, "norm_groups", "z_channels", "embed_dim", "codebook_size")
        _non_negative(self, "commitment_beta")
        mult = self.ch_mult
        _check(self, "ch_mult", len(mult) > 0 and all(isinstance(m, int) and m > 0 for m in mult),
               "must be a non-empty tuple of positive ints, e.g. '(1,2,4)'")  # fmt: skip
        # GroupNorm splits every level's channels into norm_groups groups.
        bad = [self.ch * m for m in mult if (self.ch * m) % self.norm_groups]
        _check(self, "norm_groups", not bad and self.ch % self.norm_groups == 0,
               f"must divide ch x every ch_mult (ch={self.ch}, ch_mult={mult})")  # fmt: skip
        factor = self.downsample_factor
        _check(self, "resolution", self.resolution % factor == 0,
               f"must be a multiple of the downsampling factor {factor}")  # fmt: skip
        _check(self, "dropout", self.dropout == 0, "must be 0 (dropout is not implemented)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def f4_16384(cls, **kw: Any) -> VQGANConfig:
        """The paper's VQGAN: f=4, 16384 codes of dim 3 (CompVis vq-f4 layout, 256^2)."""
        return cls(**kw)

    @classmethod
    def f8_16384(cls, **kw: Any) -> VQGANConfig:
        """512^2 frames -> the same 64x64x3 latents: one more level (f=8)."""
        return cls(**(dict(ch_mult=(1, 2, 4, 4), resolution=512) | kw))

    @classmethod
    def testing(cls, **kw: Any) -> VQGANConfig:
        """A tiny f=4 VQGAN for tests and the CPU demo (32^2 frames -> 8x8x3 latents)."""
        base = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32)
        base["codebook_size"] = 128
        return cls(**(base | kw))


@dataclasses.dataclass(frozen=True)
class VQGANLossConfig:
    """Stage-1 losses and optimiser (training/vqgan_losses.py); defaults are taming's
    `VQLPIPSWithDiscriminator` as configured by CompVis vq-f4 and DESIGN.md."""

    pixel_weight: float = 1.0  # L1
    perceptual_weight: float = 1.0  # LPIPS (VGG16, v0.1)
    codebook_weight: float = 1.0  # the whole quantiser loss (its beta lives in VQGANConfig)
    disc_start: int = 0  # generator step at which the adversarial terms switch on
    disc_weight: float = 0.75  # x the adaptive weight
    disc_factor: float = 1.0
    adaptive_weight_max: float = 1e4
    # PatchGAN (NLayerDiscriminator): 3 strided layers, 64 base channels.
    disc_layers: int = 3
    disc_channels: int = 64
    # "batch": batch statistics on every call (taming's BatchNorm2d in training mode, no
    # running averages); "group" / "none" for runs that want per-example independence.
    disc_norm: Literal["batch", "group", "none"] = "batch"
    # Adam for both networks; LDM scales its base lr by the global batch size.
    base_learning_rate: float = 4.5e-6
    scale_lr_by_batch: bool = True
    adam_b1: float = 0.5
    adam_b2: float = 0.9
    # Dead codes: a code unused for this many steps is re-initialised from a random
    # pre-quantisation latent of the current batch (0 = never).
    dead_code_steps: int = 1_000
    # Extra L1 weight inside the lower-face mask (the frames VQGAN only): pixel weights are
    # 1 + mask_weight * alpha, normalised to mean 1. Paste-back keeps only the masked region
    # of a decoded face, so that is where the decoder's fidelity counts; small models
    # otherwise spend their capacity on hair and background (0 = plain L1, as taming).
    mask_weight: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "disc_layers", "disc_channels", "adaptive_weight_max")
        _non_negative(self, "pixel_weight", "perceptual_weight", "codebook_weight", "disc_start")
        _non_negative(self, "disc_weight", "disc_factor", "base_learning_rate", "dead_code_steps")
        _non_negative(self, "mask_weight")

    def learning_rate(self, global_batch_size: int) -> float:
        return self.base_learning_rate * (global_batch_size if self.scale_lr_by_batch else 1)


@dataclasses.dataclass(frozen=True)
class SyncExpertConfig:
    """The trained lip-sync expert (models/sync_expert.py): a two-tower network mapping the
    lower half of 5 consecutive face crops and the centre frame's (audio_window, audio_dim)
    feature window to unit embeddings, trained with InfoNCE (training/sync_expert_train.py).

    The lip tower is one stride-2 3x3 conv per entry of `lip_channels` on the
    (image_size / 2, image_size) lower half, then a linear map of the flattened grid (the
    mouth's position in an aligned crop is information, so no global pooling).
    """

    image_size: int = 64
    lip_channels: tuple[int, ...] = (32, 64, 128, 256)
    audio_channels: tuple[int, ...] = (64, 128)
    embed_dim: int = 128
    # InfoNCE temperature on cosine similarities.
    temperature: float = 0.1
    # Same-clip negatives: audio shifted by min_offset..max_offset frames (either side).
    min_offset: int = 2
    max_offset: int = 15

    def __post_init__(self) -> None:
        _positive(self, "image_size", "embed_dim", "temperature", "min_offset")
        _check(self, "max_offset", self.max_offset >= self.min_offset, "must be >= min_offset")
        for name in ("lip_channels", "audio_channels"):
            value = getattr(self, name)
            _check(self, name, len(value) > 0 and all(int(c) > 0 for c in value),
                   "must be a non-empty tuple of positive ints")  # fmt: skip
        factor = 2 ** len(self.lip_channels)
        _check(self, "image_size", self.image_size % (2 * factor) == 0,
               f"must be a multiple of {2 * factor} (two x the lip tower's stride)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SyncLossConfig:
    """The trained expert's sync loss on the DiT (training/sync_loss.py), LatentSync-style:
    on the one-step x0-hat, decoded by the frozen frame VQGAN, for examples with
    t < max_timestep; batches hold runs of `group` consecutive frames of one clip.
    weight 0 = off (the paper's recipe)."""

    weight: float = 0.0
    max_timestep: int = 500
    expert_workdir: str = ""
    vqgan_workdir: str = ""
    group: int = 5

    def __post_init__(self) -> None:
        _non_negative(self, "weight")
        _positive(self, "max_timestep", "group")
        _check(self, "group", self.group == 5, "must be 5 (the expert's window)")


@dataclasses.dataclass(frozen=True)
class IFNetConfig:
    """RIFE's IFNet (models/ifnet.py) in the Practical-RIFE v4.25 / v4.26 layout: a shared
    feature encoder (`encoder_channels` per frame), then one IFBlock per entry of
    `block_channels`, block i working at 1/`scales[i]` of the input resolution (coarse to
    fine) and refining the previous block's flows, fusion mask and `feature_channels` hidden
    channels through `res_convs` residual 3x3 convs. Inputs are zero-padded (right/bottom)
    to a multiple of `pad_multiple`, as Practical-RIFE's inference script does (128 there).
    """

    block_channels: tuple[int, ...] = (192, 128, 96, 64, 32)
    scales: tuple[int, ...] = (16, 8, 4, 2, 1)
    encoder_channels: int = 16
    feature_channels: int = 8
    res_convs: int = 8
    pad_multiple: int = 128
    dtype: str = "float32"  # compute dtype; params stay float32
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive(self, "encoder_channels", "feature_channels", "res_convs", "pad_multiple")
        for name in ("block_channels", "scales"):
            value = getattr(self, name)
            _check(self, name, len(value) > 0 and all(isinstance(c, int) and c > 0 for c in value),
                   "must be a non-empty tuple of positive ints")  # fmt: skip
        blocks = len(self.block_channels)
        _check(self, "scales", len(self.scales) == blocks,
               f"must have one entry per block ({blocks} block_channels)")  # fmt: skip
        # Each block halves its width first (c // 2) and then doubles it.
        _check(self, "block_channels", all(c % 2 == 0 for c in self.block_channels),
               "must all be even")  # fmt: skip
        multiple = self.size_multiple
        _check(self, "pad_multiple", self.pad_multiple % multiple == 0,
               f"must be a multiple of {multiple} (4 x every scale: two stride-2 convs per "
               "block on the downscaled input)")  # fmt: skip

    @property
    def size_multiple(self) -> int:
        """Smallest frame-size multiple for which every block's shapes line up."""
        return math.lcm(*(4 * s for s in self.scales))


@dataclasses.dataclass(frozen=True)
class VFILossConfig:
    """The frame interpolator's objective (training/vfi_train.py): RIFE's Laplacian-pyramid
    L1 (`LapLoss`, `lap_levels` band-pass levels) of the final frame against the true middle
    frame, plus `block_weight` x the mean of the same loss over the earlier IFBlocks' merged
    frames. RIFE itself puts the reconstruction loss on the final frame only and reaches
    the earlier blocks through its privileged-distillation term (a teacher block that sees
    the answer), which we leave out; `block_weight` is the cheap stand-in for it."""

    lap_levels: int = 5
    block_weight: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "lap_levels")
        _non_negative(self, "block_weight")


@dataclasses.dataclass(frozen=True)
class TripletConfig:
    """How the interpolator's training triplets are drawn (data/vfi_triplets.py): spans n
    (img0 = frame p, img1 = p + n, the middle frame p + j at t = j / n), a random
    (crop, crop) window (0 = whole frames), and RIFE's flip / temporal-reversal augments."""

    spans: tuple[int, ...] = (2,)
    crop: int = 0
    random_flip: bool = True
    random_reverse: bool = True

    def __post_init__(self) -> None:
        _check(self, "spans", len(self.spans) > 0 and all(int(n) >= 2 for n in self.spans),
               "must be a non-empty tuple of frame distances >= 2")  # fmt: skip
        _non_negative(self, "crop")


_DATACLASSES: dict[str, type] = {
    "VQGANConfig": VQGANConfig,
    "VQGANLossConfig": VQGANLossConfig,
    "MeshConfig": MeshConfig,
    "TrainConfig": TrainConfig,
    "DiTConfig": DiTConfig,
    "DiffusionConfig": DiffusionConfig,
    "DataConfig": DataConfig,
    "SyntheticConfig": SyntheticConfig,
    "SyncExpertConfig": SyncExpertConfig,
    "SyncLossConfig": SyncLossConfig,
    "IFNetConfig": IFNetConfig,
}
