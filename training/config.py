"""Frozen, typed configuration for simulation, models and training.

Survey constants are data with a citation: DES DR2 medians (Abbott et al.
2021, ApJS 255, 20) and the sky brightness of lenstronomy's DES settings
(``lenstronomy/SimulationAPI/ObservationConfig/DES.py``), copied rather than
read from its module-level dict, which ``DES()`` mutates. The populations and
their sources are described in ``docs/simulations.md``.
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

# The out-of-distribution score's fit (training.ood), here so the CLI's defaults need no
# heavy import.
#: Share (0-1) of the in-distribution threshold set the threshold flags.
FLAGGED_FRACTION = 0.01
#: Quantile of the fit data at which the seeing term's tail is matched to the others'.
TAIL_QUANTILE = 0.99
#: Score units the seeing term is lowered by (chosen on validation sets, docs/ood.md).
SEEING_OFFSET = 2.0


@dataclass(frozen=True)
class DR2Band:
    """Median coadd conditions of one DES DR2 band.

    ``seeing_fwhm_arcsec`` and ``depth_10sigma_mag`` are the medians quoted in
    the abstract of Abbott et al. (2021), "The Dark Energy Survey Data Release
    2", ApJS 255, 20 (doi:10.3847/1538-4365/ac00b3): delivered PSF FWHM and
    coadd depth at S/N = 10 in a 1.95" diameter aperture.
    ``sky_brightness_mag_arcsec2`` is lenstronomy's DES value
    (``SimulationAPI/ObservationConfig/DES.py``), used only to split the noise
    into sky and source shot noise.
    """

    seeing_fwhm_arcsec: float
    depth_10sigma_mag: float
    sky_brightness_mag_arcsec2: float


DES_DR2_BANDS: dict[str, DR2Band] = {
    "g": DR2Band(1.11, 24.7, 22.01),
    "r": DR2Band(0.95, 24.4, 21.15),
    "i": DR2Band(0.88, 23.8, 19.89),
}

#: Diameter of the aperture in which DR2 quotes its depth (arcsec).
DEPTH_APERTURE_DIAMETER_ARCSEC = 1.95


@dataclass(frozen=True)
class SimulationConfig:
    """Everything the simulator draws from; ranges are (low, high) uniform unless noted."""

    seed: int = 20261122
    n_cutouts: int = 1000
    lens_fraction: float = 0.5
    shard_size: int = 1000
    supersampling: int = 3
    """Sub-pixels per pixel side when ray-shooting (pixels are 0.263 arcsec)."""
    # Observing conditions (training.observing; DES DR2 medians in survey_bands)
    seeing_log_sigma: float = 0.12
    """Spread (natural log) of the per-object atmosphere factor on all bands' median FWHM."""
    seeing_factor_range: tuple[float, float] = (0.72, 1.6)
    seeing_band_scatter_frac: float = 0.04
    """Per-band relative scatter of the FWHM around atmosphere factor x DR2 median."""
    moffat_fraction: float = 0.85
    """Fraction of cutouts with a Moffat PSF (the rest Gaussian)."""
    moffat_beta: tuple[float, float] = (2.0, 5.0)
    psf_ellipticity: tuple[float, float] = (0.0, 0.1)
    depth_common_sigma_mag: float = 0.2
    """Normal spread of the depth offset shared by g, r, i (mag)."""
    depth_band_sigma_mag: float = 0.1
    """Normal spread of each band's own depth offset (mag)."""
    depth_offset_range_mag: tuple[float, float] = (-0.8, 0.8)
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
    # Positives: relative frequencies of the kinds of lens (docs/simulations.md)
    lens_kinds: tuple[tuple[str, float], ...] = (("lens", 0.8), ("lensed_quasar", 0.2))
    quasar_mag_r: tuple[float, float] = (18.5, 23.0)
    """Unlensed r magnitude of the lensed quasar (uniform)."""
    lensed_quasar_source_max_frac: float = 0.6
    """Quasar offset from the lens centre (fraction of theta_E, uniform in area)."""
    lensed_quasar_inner_fraction: float = 0.3
    """Fraction of lensed quasars placed within 0.15 theta_E (inside the caustic: quads),
    standing in for the magnification bias that makes quads common in real samples."""
    min_image_separation_fwhm: float = 0.8
    """Lensed quasars: two images at least this many r-band FWHM apart."""
    min_image_snr: float = 5.0
    """Lensed quasars: the fainter of those two images has this point-source S/N."""
    # Negatives: relative frequencies of the kinds of non-lens
    negative_kinds: tuple[tuple[str, float], ...] = (
        ("plain", 0.10),
        ("companions", 0.13),
        ("tangential", 0.13),
        ("ring", 0.06),
        ("spiral", 0.07),
        ("merger", 0.06),
        ("edge_on", 0.06),
        ("star", 0.12),
        ("quasar", 0.12),
        ("star_galaxy_blend", 0.06),
        ("galaxy_blend", 0.05),
        ("group", 0.04),
    )
    ring_radius_arcsec: tuple[float, float] = (1.2, 3.5)
    """Radius range of the ring negatives' knot ellipses (arcsec); a training set may
    narrow it to the small rings that pass for lenses most (docs/models.md)."""
    star_mag_r: tuple[float, float] = (15.0, 23.0)
    star_count_slope: float = 0.08
    """Star magnitudes follow dN/dm proportional to 10**(slope m) on star_mag_r."""
    star_offset_fraction: float = 0.4
    """Fraction of star cutouts with the star off centre (up to 3 arcsec)."""
    saturation_flux: tuple[float, float] = (20000.0, 35000.0)
    """Pixel level (zero point 30 flux) at which a star's core is clipped."""
    quasar_redshift: tuple[float, float] = (0.1, 3.0)
    quasar_host_fraction: float = 0.3
    """Fraction of unlensed quasars at z < 1 that show a faint host."""
    # Artefacts on any cutout (training.artefacts)
    artefact_probability: float = 0.18
    """Fraction of cutouts (lenses too) that get one or more artefacts."""
    artefact_kinds: tuple[tuple[str, float], ...] = (
        ("satellite_trail", 0.15),
        ("cosmic_ray", 0.2),
        ("star_halo", 0.15),
        ("ghost", 0.1),
        ("masked_columns", 0.1),
        ("nan_patch", 0.1),
        ("sky_gradient", 0.1),
        ("correlated_noise", 0.1),
    )
    extra_artefact_mean: float = 0.3
    """Mean (Poisson) of further artefacts on a cutout that has one."""
    survey_bands: dict[str, DR2Band] = field(default_factory=lambda: dict(DES_DR2_BANDS))

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
    # Sized so that `make models` stays within 75 minutes on the 2-core machine
    # (docs/models.md, "Rebuilding them").
    classifier_epochs: int = 10
    regressor_epochs: int = 20
    mc_head_epochs: int = 60
    # Peak rates after a one-epoch linear warm-up, then cosine decay. The
    # regressor needs the lower rate: at 2e-3 its features died in the first
    # epoch and it predicted the mean (RMSE 0.39 arcsec in the first run).
    classifier_learning_rate: float = 2e-3
    regressor_learning_rate: float = 1e-3
    mc_head_learning_rate: float = 1e-3
    mc_head_nll_beta: float = 0.0
    """beta of the MC head's beta-NLL (training.losses.BetaGaussianNLL); 0, the plain NLL, is
    what the shipped heads used. A round at 0.5 moved the mixture mean's error by < 0.004 arcsec in
    every 0.4-arcsec bin of validation lenses (docs/calibration.md, "The mean at the ends")."""
    warmup_epochs: int = 1
    validation_fraction: float = 0.1
    loader_workers: int = 1
    """Threads that build augmented batches; batches are the same for any number."""

    def to_dict(self) -> dict:
        return asdict(self)


#: Named model and training settings for ``python -m training train --preset``.
#: ``cpu`` is the default, sized for the 2-core build machine (``make models`` 54 min); ``gpu``
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
