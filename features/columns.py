"""The feature-column schema and grammar now live in the contract (:mod:`stackkit.contract.columns`);
these names stay importable from here for existing code."""

from stackkit.contract.columns import (DICOM_META_COLUMNS, FEATURE_SETS, META_PREFIX, MODELS_PREFIX, ROLL_WINDOWS, SLICE_FEATURES,
                                       SLICE_PREFIX, TEST_KEY_COLUMNS, TOP_K, TRAIN_KEY_COLUMNS, WIDE_ROLL_WINDOWS, check_feature_set,
                                       feature_columns, model_feature_names, reversal_map, reverse_features, roll_windows,
                                       split_column)

__all__ = ["DICOM_META_COLUMNS", "FEATURE_SETS", "META_PREFIX", "MODELS_PREFIX", "ROLL_WINDOWS", "SLICE_FEATURES", "SLICE_PREFIX",
           "TEST_KEY_COLUMNS", "TOP_K", "TRAIN_KEY_COLUMNS", "WIDE_ROLL_WINDOWS", "check_feature_set", "feature_columns",
           "model_feature_names", "reversal_map", "reverse_features", "roll_windows", "split_column"]
