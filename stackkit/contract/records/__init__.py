"""The work directory's records, one frozen dataclass each, with one writer and one validating reader:
``preds/<model>/model.json`` (:mod:`.model`, written only by :func:`publish_model`),
``features/manifest.json`` (:mod:`.features`), a stacker's ``meta.json`` and its fold models'
``stacker.json`` (:mod:`.stacker`) and ``stack/blend.json`` (:mod:`.blend`; a unit task's: :mod:`.unit_blend`), ``data/task.json`` (:mod:`.task`). Readers raise the
contract's one-line errors naming the file and the field."""

from stackkit.contract.records.blend import BlendRecord, check_blend_record, read_blend_record, write_blend_record
from stackkit.contract.records.features import (FeaturesManifest, manifest_test_fold_paths, read_features_manifest,
                                                write_features_manifest)
from stackkit.contract.records.model import ModelRecord, publish_model, read_model_record
from stackkit.contract.records.stacker import (FoldModelRecord, StackerRecord, read_fold_model_record, read_stacker_record,
                                               write_fold_model_record, write_stacker_record)
from stackkit.contract.records.task import TaskRecord, read_task, read_task_record, write_task_record
from stackkit.contract.records.unit_blend import UnitBlendRecord, read_unit_blend_record, write_unit_blend_record

__all__ = ["BlendRecord", "FeaturesManifest", "FoldModelRecord", "ModelRecord", "StackerRecord", "check_blend_record",
           "manifest_test_fold_paths", "publish_model", "read_blend_record", "read_features_manifest", "read_fold_model_record",
           "read_model_record", "read_stacker_record", "write_blend_record", "write_features_manifest", "write_fold_model_record",
           "write_stacker_record", "TaskRecord", "read_task", "read_task_record", "write_task_record", "UnitBlendRecord",
           "read_unit_blend_record", "write_unit_blend_record"]
