"""The whole recipe through the console scripts on every SR family spandrel loads (tiny, random weights).

For each family of ``tests/test_families.py`` (the same tiny builders, loud where the test makes them loud), in a
scratch folder: ``2dq-calibrate`` with the recipe of ``best_rows.md`` (per-channel weights, smoothing, shifts,
input rotations, block reconstruction with learned rounding; a token 5 steps per block) -> ``2dq-export`` ->
``2dq-build-engine --backend ort --verify`` on Set5 (one noise draw). Writes the verdicts as a markdown table.
Generality, not quality: random weights have no PSNR worth reading.

    python benchmarks/families.py --data ../shared/datasets --out benchmarks/results/families.json \
        --markdown benchmarks/families_table.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import tiny_models  # noqa: E402
from tests.test_families import FAMILIES  # noqa: E402

RECIPE = ("--granularity", "per-channel", "--smooth", "all", "--shifts", "--rotate", "inputs", "--reconstruct",
          "--learned-rounding", "--reconstruct-iters", "5")


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run_family(family: str, folder: Path, data: Path) -> dict:
    build, tile, gain, selection = FAMILIES[family]
    checkpoint = tiny_models.save_checkpoint(tiny_models.make_loud(build(scale=2), gain), folder / f"{family}.safetensors")
    artifact, onnx_path, engine, verdict = (folder / f"{family}{suffix}" for suffix in
                                            (".q.safetensors", ".onnx", ".ort.onnx", ".json"))
    commands = [
        ["2dq-calibrate", "--weights", str(checkpoint), "--out", str(artifact), "--patches", "8", "--no-progress", "-q",
         "--quantize", ",".join(selection), *RECIPE],
        ["2dq-export", "--onnx", str(onnx_path), "--weights", str(checkpoint), "--calib", str(artifact),
         "--tile", str(tile), "-q"],
        ["2dq-build-engine", "--backend", "ort", "--onnx", str(onnx_path), "--out", str(engine), "--verify",
         "--weights", str(checkpoint), "--calib", str(artifact), "--data", str(data), "--sets", "Set5",
         "--noise-draws", "1", "--no-progress", "-q", "--json", str(verdict)],
    ]
    start = time.perf_counter()
    for command in commands:
        done = subprocess.run([_tool(command[0]), *command[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            return {"family": family, "failed": command[0], "error": done.stderr.strip().splitlines()[-1:],
                    "seconds": time.perf_counter() - start}
    result = json.loads(verdict.read_text())["verification"]
    return {"family": family, "quantize": ",".join(selection), "tile": tile, "passed": result["passed"],
            "psnr_vs_reference": result["psnr_vs_reference"], "floor": result["floor"],
            "seconds": time.perf_counter() - start}


def markdown(rows: list[dict]) -> str:
    lines = ["| family | quantized | tile | `--verify` (engine vs reference / floor, dB) | seconds |",
             "|---|---|---:|---|---:|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['family']} | - | - | {row['failed']} failed: {' '.join(row['error'])} | "
                         f"{row['seconds']:.0f} |")
            continue
        psnr = row["psnr_vs_reference"]
        psnr = f"{psnr:.1f}" if isinstance(psnr, float) else psnr
        lines.append(f"| {row['family']} | {row['quantize']} | {row['tile']} | "
                     f"{'PASS' if row['passed'] else 'FAIL'} ({psnr} / {row['floor']:.1f}) | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "toolchain" / "assets" / "datasets",
                        help="benchmark root holding Set5 (default: the shipped one)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the rows")
    parser.add_argument("--markdown", type=Path, help="the table as markdown")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families.split(","):
            rows.append(run_family(family, Path(scratch), args.data))
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"recipe": list(RECIPE), "rows": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows))


if __name__ == "__main__":
    main()
