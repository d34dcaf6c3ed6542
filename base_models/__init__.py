"""Level-1 CNN base models in plain torch: DICOM pixels -> windowed channels -> per-fold ResNets.

Importing this package is cheap: torch and pydicom are imported by the modules that need them
(``base_models.train``, ``base_models.archs``, ``base_models.pixels`` functions).
"""

DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = (
    (40.0, 80.0),  # brain
    (80.0, 200.0),  # subdural
    (40.0, 380.0),  # soft tissue
)
