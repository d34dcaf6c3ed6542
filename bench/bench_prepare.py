"""Header-scan throughput of `data prepare` on >= 20,000 synthetic RSNA DICOM files.

    python bench/bench_prepare.py [--patients 750] [--repeats 3]

The dataset is generated once into bench/out/ (gitignored) and reused. The page cache is
warmed with one untimed scan, then each configuration is timed (best of --repeats):
the fast reader with workers=1 and workers=all cores, a pydicom ``dcmread(stop_before_pixels)``
baseline on a sample, and the whole ``prepare_data`` (scan + labels + folds + writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from stackkit.contract import Workdir
from stackkit.data.dicom import scan_headers
from stackkit.data.prepare import prepare_data
from stackkit.data import synth as synth_module
from stackkit.data.synth import TEST_DIR, TRAIN_CSV, TRAIN_DIR, synthesize

OUT = Path(__file__).resolve().parent / "out"


def dataset(patients: int, size: int) -> Path:
    # keyed by the generator's source too: a changed generator never reuses a stale dataset
    version = hashlib.sha256(Path(synth_module.__file__).read_bytes()).hexdigest()[:8]
    root = OUT / f"prepare_p{patients}_s{size}_{version}"
    marker = root / "summary.json"
    if marker.is_file():
        return root
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix=".tmp-"))
    start = time.perf_counter()
    summary = synthesize(tmp, patients=patients, size=size, seed=0, progress=True)
    print(f"synth: {summary.train_images + summary.test_images} files in {time.perf_counter() - start:.1f} s")
    (tmp / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), default=str))
    for stale in OUT.glob(f"prepare_p{patients}_s{size}_*"):  # datasets of older generator versions
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, root)
    return root


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=750)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = dataset(args.patients, args.size)
    paths = sorted(str(p) for p in root.glob("stage_2_*/*.dcm"))
    cores = os.cpu_count() or 1
    print(f"dataset: {root} ({len(paths)} files), {cores} cores")

    scan_headers(paths, workers=cores, progress=False)  # warm the page cache
    for workers in (1, cores):
        seconds = best_of(args.repeats, lambda: scan_headers(paths, workers=workers, progress=False))
        print(f"scan_headers workers={workers}: {len(paths) / seconds:,.0f} files/s ({seconds:.2f} s wall)")
    # CPU time of the in-process scan: a figure that other jobs on a shared machine do not distort
    cpu = time.process_time()
    scan_headers(paths, workers=1, progress=False)
    cpu = time.process_time() - cpu
    print(f"scan_headers workers=1: {len(paths) / cpu:,.0f} files per CPU-second ({os.getloadavg()[0]:.1f} load average)")

    import pydicom

    sample = paths[:2000]

    def plain_pydicom():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Invalid value for VR UI")
            for path in sample:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ds.SOPInstanceUID, ds.ImagePositionPatient  # noqa: B018 - force value conversion

    seconds = best_of(1, plain_pydicom)
    print(f"baseline pydicom.dcmread(stop_before_pixels) workers=1: {len(sample) / seconds:,.0f} files/s")

    with tempfile.TemporaryDirectory(dir=OUT) as work:
        def whole():
            prepare_data(Workdir(Path(work)), dicom_dir=root / TRAIN_DIR, test_dicom_dir=root / TEST_DIR,
                         labels_csv=root / TRAIN_CSV, progress=False)

        first = best_of(1, whole)
        seconds = best_of(args.repeats, whole)
        print(
            f"prepare_data end to end (workers={cores}): {seconds:.2f} s = {len(paths) / seconds:,.0f} files/s "
            f"(first call, with sklearn/pyarrow imports: {first:.2f} s)"
        )


if __name__ == "__main__":
    main()
