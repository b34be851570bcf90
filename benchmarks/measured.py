"""Measured-like data through the entry points: the simulated beamline preset.

Writes the preset (:mod:`ptycho.data.beamline`: 256 px frames, zero frequency in the
corner and off-centre, beamstop and module gap in the file's mask, hot and dead pixels,
a dark background, positions in metres from a random origin, an analytical probe guess)
and its ideal version, then runs, each as a user would (``infer.py`` / ``train.py``):

- ``refine=full`` on the ideal scan (the same signal counts, centred, no mask, no
  background, no bad pixels);
- ``refine=full`` on the preset file with every default (``data.crop=128`` cuts the
  window the ideal scan has);
- the same without the mask and background handling (``data.mask=null
  data.mask_hot_pixels=false data.background=null``);
- in-process, the ideal counts plus the dark frame's own Poisson noise, the background
  modelled (what no preparation can recover, separating it from what preparing loses)
  or subtracted and clipped at zero (the alternative to modelling it);
- the network on the preset file (``train.py``, the default budget) with the analytical
  guess, with the refined probe (``data.probe_path=`` the refinement's
  ``reconstruction.npz``) and with ``train.probe=refine``.

Every reconstruction is scored against the preset's truth (the same frame: the file's
positions, placed by preparation, are the truth's). One JSON line per run in
``--json``.

    python benchmarks/measured.py --json benchmarks/results/measured_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptycho import figures  # noqa: E402
from ptycho.data import load_scan  # noqa: E402
from ptycho.data.beamline import BeamlineSpec, write_beamline  # noqa: E402
from ptycho.refine import RefineOptions, Refiner  # noqa: E402
from ptycho.scoring import Scorer  # noqa: E402


def entry_point(script: str, run_dir: Path, *overrides: str) -> dict:
    """Run ``train.py``/``infer.py`` with ``overrides`` into ``run_dir``; its metrics."""
    command = [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir.parent)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def in_truth_frame(scorer: Scorer, image: np.ndarray) -> np.ndarray:
    """``image`` padded with zeros or cut to the truth's shape (the same frame)."""
    frame = np.zeros(scorer.scan.object.shape, image.dtype)
    height, width = (min(a, b) for a, b in zip(frame.shape, image.shape, strict=True))
    frame[:height, :width] = image[:height, :width]
    return frame


def truth_scores(scorer: Scorer, obj: np.ndarray) -> dict:
    """Ground-truth metrics of ``obj`` in the truth's frame."""
    scores = scorer.truth(in_truth_frame(scorer, obj.astype(np.complex64)))
    return {key: scores[key] for key in ("amp_ssim", "phase_ssim", "amp_psnr", "phase_psnr")}


def save_figure(scorer: Scorer, reconstruction: Path, path: Path) -> None:
    """Truth / reconstruction / error of a run of the preset file (the truth's frame)."""
    with np.load(reconstruction) as saved:
        obj, mask = saved["obj"], saved["mask"]
    frame = in_truth_frame(scorer, obj.astype(np.complex64))
    covered = in_truth_frame(scorer, mask)
    figures.save_reconstruction_png(
        frame,
        covered,
        path,
        title="preset.cxi, every default (data.crop=128), infer.py refine=full",
        values=truth_scores(scorer, frame),
        comparison=scorer.compare(frame),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="append one JSON line per run here")
    parser.add_argument("--minutes", type=float, default=9.0, help="train.max_minutes")
    parser.add_argument("--skip-network", action="store_true")
    parser.add_argument("--dark", type=float, default=BeamlineSpec.dark)
    parser.add_argument("--keep", type=Path, help="keep the files and runs in this folder")
    parser.add_argument(
        "--figure", type=Path, help="write the defaults' refinement against the truth here"
    )
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptycho-measured-"))
    folder.mkdir(parents=True, exist_ok=True)
    spec = BeamlineSpec(dark=args.dark)
    preset = write_beamline(folder / "preset.cxi", spec)
    ideal_path = folder / "preset_ideal.npz"
    scorer = Scorer(preset.ideal)
    rows = []

    def record(case: str, stage: str, metrics: dict, obj_path: Path | None = None, **extra):
        row = {
            "case": case,
            "stage": stage,
            "dark": args.dark,
            "nphotons": spec.nphotons,
            "r_factor": metrics.get("refined_r_factor", metrics.get("r_factor")),
            "seconds": metrics.get("wall_seconds"),
            **extra,
        }
        if obj_path is not None:
            with np.load(obj_path) as saved:
                row.update(truth_scores(scorer, saved["obj"]))
        rows.append(row)
        print(json.dumps(row), flush=True)

    cxi = ["data=npz", f"data.path={folder / 'preset.cxi'}", "data.crop=128"]
    raw = ["data.mask=null", "data.mask_hot_pixels=false", "data.background=null"]
    for case, overrides in (
        ("ideal", ["data=npz", f"data.path={ideal_path}"]),
        ("preset, defaults", cxi),
        ("preset, no mask or background handling", [*cxi, *raw]),
    ):
        run_dir = folder / case.replace(", ", "_").replace(" ", "-")
        metrics = entry_point("infer.py", run_dir, *overrides, "refine=full")
        record(case, "refine=full", metrics, run_dir / "reconstruction.npz")

    if args.figure:
        save_figure(scorer, folder / "preset_defaults" / "reconstruction.npz", args.figure)

    # The dark's own noise on the ideal counts, modelled exactly: the floor.
    prepared = load_scan(folder / "preset.cxi", n=spec.n)
    rng = np.random.default_rng(spec.seed + 1)
    counts = preset.ideal.diffraction.astype(np.float64) ** 2
    counts += rng.poisson(np.broadcast_to(prepared.background, counts.shape))
    noisy = preset.ideal.replace(
        diffraction=np.sqrt(counts).astype(np.float32), background=prepared.background
    )
    clipped = preset.ideal.replace(
        diffraction=np.sqrt(np.maximum(counts - prepared.background, 0)).astype(np.float32)
    )
    for case, scan in (
        ("ideal + the dark's noise, background modelled", noisy),
        ("ideal + the dark's noise, background subtracted and clipped", clipped),
    ):
        started = time.perf_counter()
        result = Refiner(scan, RefineOptions(mode="full"), shape=preset.ideal.object.shape).run()
        rows.append(
            {
                "case": case,
                "stage": "refine=full (in-process)",
                "dark": args.dark,
                "nphotons": spec.nphotons,
                "r_factor": result.r_factor,
                "seconds": time.perf_counter() - started,
                **truth_scores(scorer, result.obj),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    if not args.skip_network:
        refined = folder / "preset_defaults" / "reconstruction.npz"
        train = [*cxi, f"train.max_minutes={args.minutes}"]
        for case, overrides in (
            ("preset, analytical probe guess", train),
            ("preset, data.probe_path=<refined run>", [*train, f"data.probe_path={refined}"]),
            ("preset, train.probe=refine", [*train, "train.probe=refine"]),
        ):
            run_dir = folder / case.split(", ")[1].split("=")[0].replace(" ", "-").replace(".", "_")
            metrics = entry_point("train.py", run_dir, *overrides)
            record(
                case,
                "network",
                metrics,
                run_dir / "reconstruction.npz",
                epochs=metrics.get("epochs"),
            )
    if args.json:
        with open(args.json, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
