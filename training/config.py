"""Frozen, typed configuration for simulation, models and training.

Survey constants are copied from lenstronomy's DES observation settings
(``lenstronomy/SimulationAPI/ObservationConfig/DES.py``, after Abbott et al.
2018, DES DR1) rather than read from its module-level dict, which ``DES()``
mutates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BANDS: tuple[str, ...] = ("g", "r", "i")
PIXEL_SCALE_ARCSEC = 0.263
CUTOUT_PIXELS = 64
#: AB zero point of the pixel values written and expected (flux = 10**(-0.4 (m - 30))).
OUTPUT_ZERO_POINT_AB = 30.0
#: Seed of the repository's sample cutouts, ``examples/cutouts`` (``training/samples.py``).
SAMPLES_SEED = 13


@dataclass(frozen=True)
class BandObservation:
    """One DES band (lenstronomy DES.py, copied): per-exposure values."""

    exposure_time_s: float
    sky_brightness_mag_arcsec2: float
    magnitude_zero_point: float
    seeing_fwhm_arcsec: float
    read_noise_electrons: float = 7.0
    ccd_gain_electrons_per_adu: float = 4.0
    exposures_per_year: float = 10.0 / 3.0
    """lenstronomy's DES setting: 10 exposures per band for a 3-year coadd."""


DES_BANDS: dict[str, BandObservation] = {
    "g": BandObservation(90.0, 22.01, 26.58, 1.12),
    "r": BandObservation(90.0, 21.15, 26.78, 0.96),
    "i": BandObservation(90.0, 19.89, 26.75, 0.88),
}


@dataclass(frozen=True)
class SimulationConfig:
    """Everything the simulator draws from; ranges are (low, high) uniform unless noted."""

    seed: int = 20261122
    n_cutouts: int = 1000
    lens_fraction: float = 0.5
    shard_size: int = 1000
    supersampling: int = 3
    """Sub-pixels per pixel side when ray-shooting (pixels are 0.263 arcsec)."""
    # Observing conditions
    survey_years: tuple[float, float] = (1.0, 6.0)
    seeing_scatter_frac: tuple[float, float] = (0.75, 1.45)
    """Per-object multiplier on each band's median seeing FWHM, drawn per band."""
    moffat_fraction: float = 0.5
    moffat_beta: tuple[float, float] = (2.0, 5.0)
    psf_ellipticity: tuple[float, float] = (0.0, 0.08)
    sky_offset_mag: tuple[float, float] = (-0.6, 0.4)
    # Deflector light and mass
    deflector_mag_i: tuple[float, float] = (17.5, 21.0)
    deflector_colour_gr: tuple[float, float] = (0.9, 1.9)
    deflector_colour_ri: tuple[float, float] = (0.35, 0.75)
    deflector_r_eff_arcsec: tuple[float, float] = (0.5, 3.0)
    deflector_sersic_n: tuple[float, float] = (2.0, 6.0)
    theta_E_arcsec: tuple[float, float] = (0.45, 3.2)
    mass_q: tuple[float, float] = (0.45, 1.0)
    power_law_fraction: float = 0.5
    power_law_gamma: tuple[float, float] = (1.8, 2.25)
    shear_max: float = 0.1
    center_sigma_arcsec: float = 0.1
    light_mass_angle_scatter_deg: float = 20.0
    # Sources
    source_mag_r: tuple[float, float] = (20.5, 25.5)
    source_colour_gr: tuple[float, float] = (-0.1, 0.6)
    source_colour_ri: tuple[float, float] = (-0.2, 0.4)
    source_r_eff_arcsec: tuple[float, float] = (0.08, 0.7)
    source_sersic_n: tuple[float, float] = (0.5, 2.5)
    source_max_clumps: int = 5
    source_position_max_frac: float = 0.8
    """Source offset (fraction of theta_E, uniform in area) for lenses."""
    # Lens visibility rule
    min_arc_snr: float = 20.0
    min_magnification: float = 3.0
    require_resolved: bool = True
    """Collett (2015): theta_E^2 > r_source^2 + (seeing FWHM / 2)^2 in the r band."""
    # Negatives: relative frequencies of the kinds of non-lens
    negative_kinds: tuple[tuple[str, float], ...] = (
        ("plain", 0.2),
        ("companions", 0.25),
        ("tangential", 0.25),
        ("ring", 0.1),
        ("spiral", 0.1),
        ("merger", 0.1),
    )
    bands: dict[str, BandObservation] = field(default_factory=lambda: dict(DES_BANDS))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture shared by the three models."""

    input_shape: tuple[int, int, int] = (CUTOUT_PIXELS, CUTOUT_PIXELS, len(BANDS))
    stage_filters: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: tuple[int, ...] = (1, 2, 2, 2)
    feature_units: int = 256
    train_dropout: float = 0.2
    mc_dropout: float = 0.1
    mc_head_units: int = 256
    mc_samples: int = 100

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> ModelConfig:
        """The config :meth:`to_dict` wrote (JSON lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings; epochs are over the training split."""

    seed: int = 7
    batch_size: int = 128
    classifier_epochs: int = 16
    regressor_epochs: int = 30
    mc_head_epochs: int = 60
    # Peak rates after a one-epoch linear warm-up, then cosine decay. The
    # regressor needs the lower rate: at 2e-3 its features died in the first
    # epoch and it predicted the mean (RMSE 0.39 arcsec in the first run).
    classifier_learning_rate: float = 2e-3
    regressor_learning_rate: float = 1e-3
    mc_head_learning_rate: float = 1e-3
    warmup_epochs: int = 1
    validation_fraction: float = 0.1
    loader_workers: int = 1
    """Threads that build augmented batches; batches are the same for any number."""

    def to_dict(self) -> dict:
        return asdict(self)


#: Named model and training settings for ``python -m training train --preset``.
#: ``cpu`` is the default, sized for the 2-core build machine (54 min); ``gpu``
#: is sized for one H100 with ``KERAS_BACKEND=jax`` and about 100 000 training
#: cutouts: twice the trunk width and more epochs, same inputs, outputs and
#: MC design, so serving and the ONNX export are unchanged.
PRESETS: dict[str, tuple[ModelConfig, TrainingConfig]] = {
    "cpu": (ModelConfig(), TrainingConfig()),
    "gpu": (
        ModelConfig(stage_filters=(32, 64, 128, 256)),
        TrainingConfig(
            classifier_epochs=24, regressor_epochs=80, mc_head_epochs=40, loader_workers=8
        ),
    ),
}
