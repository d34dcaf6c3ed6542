"""Steps 3-4, level 2: the stackers (`stackers/`, one module each), the fold loop over the contract's
folds (`crossfit`), Optuna tuning (`tune`) and its storages (`storage`), the blend (`blend`),
`stack fit` itself (`fit`) and its HTML report (`report`).

Importing this package imports neither torch, LightGBM nor XGBoost.
"""
