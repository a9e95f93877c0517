"""``2dq-report`` end to end on a tiny SwinIR x2 with MinMax and DOBI artifacts, and its pieces.

The report is built once (module fixture) from real calibration patches and 64x64 crops of the
first Set5 images (LR made with the MATLAB bicubic port); the tests then check that what the page
and its figures show is what the data, the artifacts and ``evaluate_set`` say.
"""
from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calib.artifact import load_artifact, load_quantized_model
from calib.cli import main as calibrate
from calib.observers import batch_forward_loop
from calib.report import figures
from calib.report.cli import main as report, staged_folder
from calib.report.crops import best_window
from calib.report.sources import calibration_patches, dobi_options
from calib.report.stats import CountHistogram, bound_specs, collect_stats, rank_affected
from engines.upscalers import make_upscaler
from toolchain.data.imresize import bicubic_degrade
from toolchain.data.io import read_image, to_uint8, write_image
from toolchain.evaluate import evaluate_set
from toolchain.quant import float_mode, grid, quantizers

from ...tiny_models import save_checkpoint, tiny_swinir

SCALE = 2
#: HR side of the test images (Set5 crops), and how many are written / evaluated
HR_SIDE, IMAGES, MAX_IMAGES = 64, 3, 2
CHROMIUM = Path("/usr/bin/chromium")


def _write_benchmark(datasets_dir: Path, root: Path, count: int) -> Path:
    """``root/Set5``: centre crops of the first ``count`` Set5 HR images and their bicubic LR."""
    for hr_path in sorted((datasets_dir / "Set5" / "HR").glob("*.png"))[:count]:
        hr = to_uint8(read_image(hr_path))
        top, left = (hr.shape[0] - HR_SIDE) // 2, (hr.shape[1] - HR_SIDE) // 2
        crop = hr[top:top + HR_SIDE, left:left + HR_SIDE]
        write_image(root / "Set5" / "HR" / hr_path.name, crop)
        write_image(root / "Set5" / "LR_bicubic" / f"X{SCALE}" / f"{hr_path.stem}x{SCALE}.png",
                    bicubic_degrade(crop, SCALE))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, datasets_dir, calib_images):
    """Checkpoint, MinMax and DOBI artifacts, test data, and one report (MinMax main, DOBI compared)."""
    tmp = tmp_path_factory.mktemp("report")
    weights = save_checkpoint(tiny_swinir(scale=SCALE, seed=0), tmp / "tiny_x2.safetensors")
    artifacts = {}
    for method in ("minmax", "dobi"):
        artifacts[method] = tmp / f"{method}.safetensors"
        code = calibrate(["--weights", str(weights), "--calib-images", str(calib_images), "--method", method,
                          "--patches", "4", "--patch-size", "16", "--bins", "256", "--out", str(artifacts[method]),
                          "--no-progress", "-q"])
        assert code == 0
    data = _write_benchmark(datasets_dir, tmp / "data", IMAGES)
    expected_data = _write_benchmark(datasets_dir, tmp / "data_first", MAX_IMAGES)
    out = tmp / "out"
    code = report(["--weights", str(weights), "--calib", str(artifacts["minmax"]), "--compare",
                   str(artifacts["dobi"]), "--data", str(data), "--sets", "Set5", "--max-images", str(MAX_IMAGES),
                   "--crops", "2", "--top", "3", "--paper-table",
                   str(datasets_dir.parent / "reference" / "paper_table3.csv"), "--out-dir", str(out), "--no-progress",
                   "-q"])
    assert code == 0
    return dict(weights=weights, artifacts=artifacts, data=data, expected_data=expected_data, out=out,
                record=json.loads((out / "report.json").read_text()), page=(out / "index.html").read_text())


def _stats(setup, main: str, compare: tuple[str, ...] = (), dobi=None):
    """The report's per-quantizer statistics, collected through the library API."""
    paths = [setup["artifacts"][main], *(setup["artifacts"][c] for c in compare)]
    models = [load_quantized_model(setup["weights"], p) for p in paths]
    labels = [main, *compare]
    artifact = load_artifact(paths[0])
    lr, used = calibration_patches(artifact, SCALE)
    loop = batch_forward_loop(lr, used["batch_size"], progress=False)
    specs = {label: bound_specs(m) for label, m in zip(labels, models)}
    return collect_stats(models[0], loop, main, specs, dobi if dobi is not None else dobi_options(artifact.meta)), lr


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.links += [value for name, value in attrs if name in ("src", "href") and value]
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in_cell = False if tag in ("td", "th") else self._in_cell

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def test_page_links_only_existing_local_files(setup):
    parser = _Links()
    parser.feed(setup["page"])
    files = [link for link in parser.links if not link.startswith("#")]
    assert any(link.startswith("figures/q01_") for link in files) and any("crop0_" in link for link in files)
    for link in files:
        assert (setup["out"] / link).is_file(), link
    assert "http://" not in setup["page"] and "https://" not in setup["page"]
    assert not parser.tags & {"script", "link", "iframe"}
    figures_on_disk = {p.name for p in (setup["out"] / "figures").iterdir()}
    assert figures_on_disk == {Path(link).name for link in files}  # nothing written that the page omits
    assert not list(setup["out"].parent.glob(".out.*"))  # the staging folder was renamed, nothing left


def test_quality_table_equals_evaluate_set(setup):
    weights, data = setup["weights"], setup["expected_data"]
    upscalers = {"bicubic": make_upscaler("bicubic", scale=SCALE),
                 "FP (SwinIR x2)": make_upscaler("torch", weights=str(weights)),
                 "minmax W4A4": make_upscaler("torch", weights=str(weights), calib=str(setup["artifacts"]["minmax"])),
                 "dobi W4A4": make_upscaler("torch", weights=str(weights), calib=str(setup["artifacts"]["dobi"]))}
    parser = _Links()
    parser.feed(setup["page"])
    for label, upscaler in upscalers.items():
        expected = evaluate_set(upscaler, data, "Set5", SCALE, progress=False)
        assert expected.images == MAX_IMAGES
        assert setup["record"]["quality"][label] == [expected.to_dict()]
        row = parser.cells.index(label)
        assert parser.cells[row + 1:row + 3] == [f"{expected.psnr:.2f}", f"{expected.ssim:.4f}"]
    assert "not SwinIR-light" in setup["page"] and "MinMax W4A4 (paper)" in parser.cells


def test_bounds_drawn_at_artifact_values(setup):
    stats, _ = _stats(setup, "minmax", ("dobi",), dobi="dobi")
    minmax = load_artifact(setup["artifacts"]["minmax"]).bounds
    dobi = load_artifact(setup["artifacts"]["dobi"]).bounds
    for s in rank_affected(stats)[:3] + [stats[0]]:
        fig = figures.quantizer_figure(s)
        lines = {line.get_gid(): line.get_xdata() for line in fig.axes[0].get_lines()}
        for gid, tensors in (("final", minmax), ("dobi", dobi)):
            for end in ("lower", "upper"):
                assert lines[f"{gid}-{end}"][0] == lines[f"{gid}-{end}"][1] == float(tensors[f"{s.name}.{end}"])
        (patch,) = [p for p in fig.axes[0].patches if p.get_gid() == "histogram"]
        values, edges, _ = patch.get_data()
        assert values.sum() == s.count
        assert edges[0] <= s.minimum and edges[-1] > s.maximum
    block = [s for s in stats if s.block == stats[0].block]
    fig = figures.block_figure(stats[0].block, block)
    for ax, s in zip(fig.axes, block):
        lines = {line.get_gid(): line.get_xdata()[0] for line in ax.get_lines()}
        assert lines["final-upper"] == float(minmax[f"{s.name}.upper"])
    # the page's record holds the same numbers
    recorded = {q["name"]: q for q in setup["record"]["quantizers"]}
    for s in stats:
        assert recorded[s.name]["final"]["upper"] == float(minmax[f"{s.name}.upper"])
        assert recorded[s.name]["dobi"]["lower"] == float(dobi[f"{s.name}.lower"])
        assert recorded[s.name]["final"]["inside"] == s.final.inside


def test_in_range_share_equals_an_independent_count(setup):
    stats, lr = _stats(setup, "dobi", dobi="dobi")
    by_name = {s.name: s for s in stats}
    model = load_quantized_model(setup["weights"], setup["artifacts"]["dobi"])
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [q.register_forward_pre_hook(lambda module, args: seen.setdefault(module.name, []).append(
        args[0].detach().numpy().copy())) for q in quantizers(model).values()]
    with torch.no_grad(), float_mode(model):  # the calibration data is the float model's
        for start in range(0, lr.shape[0], 8):
            model(lr[start:start + 8])
    for hook in hooks:
        hook.remove()
    for name, q in quantizers(model).items():
        data = np.concatenate([a.reshape(-1) for a in seen[name][:1 if q.kind == "weight" else None]])
        step, zero = grid.step_and_zero_point(q.lower.detach(), q.upper.detach(), q.bits, q.symmetric)
        codes = np.round(data / step.numpy())
        kept = np.count_nonzero((codes >= -zero.numpy()) & (codes <= grid.levels(q.bits) - zero.numpy()))
        assert by_name[name].count == data.size
        assert by_name[name].final.inside == kept / data.size, name
    worst = rank_affected(stats)[0]
    assert worst.final.inside < 1.0  # DOBI clips something, so the ranking is about real clipping
    assert by_name[worst.name].clipped == max(s.clipped for s in stats)


def test_recomputed_dobi_equals_the_dobi_artifact(setup):
    """Without a DOBI artifact the report recomputes DOBI from the same patches and histograms."""
    dobi_artifact = load_artifact(setup["artifacts"]["dobi"])
    stats, _ = _stats(setup, "minmax", dobi=dobi_options(dobi_artifact.meta))
    for s in stats:
        assert float(s.dobi.lower) == float(dobi_artifact.bounds[f"{s.name}.lower"]), s.name
        assert float(s.dobi.upper) == float(dobi_artifact.bounds[f"{s.name}.upper"]), s.name
        assert s.dobi.exact == (s.kind == "weight")
    reference, _ = _stats(setup, "minmax", ("dobi",), dobi="dobi")  # exact shares, from the DOBI artifact
    for s, exact in zip(stats, reference):
        bins = s.histogram.counts
        # the estimate interpolates inside the two bins that hold the bounds
        assert abs(s.dobi.inside - exact.dobi.inside) <= 2 * bins.max() / bins.sum()


def test_crop_is_where_outputs_differ_most():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    changed = base.copy()
    changed[70:86, 100:116] = 255 - changed[70:86, 100:116]  # the only difference: a 16x16 square
    window = best_window([base, changed, base], size=32, border=2)
    assert window.top <= 70 and window.top + 32 >= 86 and window.left <= 100 and window.left + 32 >= 116
    assert best_window([base, base], size=32).score == 0.0


def test_report_crops_are_the_best_windows(setup):
    crops = setup["record"]["crops"]
    assert [c["image"] for c in crops] and all(c["size"] <= HR_SIDE for c in crops)
    scores = [c["score"] for c in crops]
    assert scores == sorted(scores, reverse=True)
    for k, crop in enumerate(crops):
        hr = np.asarray(Image.open(setup["out"] / "figures" / f"crop{k}_0.png"))
        original = to_uint8(read_image(setup["data"] / "Set5" / "HR" / f"{crop['image']}.png"))
        window = original[crop["top"]:crop["top"] + crop["size"], crop["left"]:crop["left"] + crop["size"]]
        assert np.array_equal(hr, window)


def test_histogram_counts_are_exact():
    width = 2.0 ** -6
    rng = np.random.default_rng(1)
    bins = rng.integers(-300, 500, 20000)
    values = torch.from_numpy((bins + 0.5) * width).float()  # bin centres: no edge ambiguity
    hist = CountHistogram(bins=128)
    for part in values.split(3000):
        hist.update(part)
    assert hist.count == values.numel() and hist.counts.sum() == values.numel()
    edges = (hist.first + np.arange(hist.counts.numel() + 1)) * hist.width
    expected, _ = np.histogram(values.numpy(), edges)
    assert np.array_equal(hist.counts.numpy(), expected)


def test_staged_folder_keeps_the_old_report_on_failure(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").write_text('<meta name="generator" content="2dq-report">old')
    with pytest.raises(RuntimeError):
        with staged_folder(out) as build:
            (build / "index.html").write_text("half")
            raise RuntimeError("boom")
    assert (out / "index.html").read_text().endswith("old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with staged_folder(out) as build:
        (build / "index.html").write_text("new")
    assert (out / "index.html").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_refuses_a_foreign_out_folder_and_bad_options(setup, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    base = ["--weights", str(setup["weights"]), "--calib", str(setup["artifacts"]["dobi"]), "--data",
            str(setup["data"]), "--sets", "Set5", "--no-progress", "-q"]
    assert report([*base, "--out-dir", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert report([*base, "--out-dir", str(tmp_path / "r"), "--max-images", "0"]) == 2
    missing = tmp_path / "absent.safetensors"
    assert report([*base, "--compare", str(missing), "--out-dir", str(tmp_path / "r")]) == 1
    assert "absent.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no headless browser at {CHROMIUM}")
def test_page_renders_in_a_headless_browser(setup, tmp_path):
    shot = tmp_path / "page.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
               (setup["out"] / "index.html").resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels.std() > 10  # text, tables and images, not a blank page


def test_block_names_and_ranking():
    from calib.report.stats import block_of

    assert block_of("layers.0.residual_group.blocks.1.attn.qkv.input") == "layers.0.residual_group.blocks.1"
    assert block_of("encoder_layer1.blocks.0.ngram_window_partition.ngram_context.ngram_attn.qkv.input") == \
        "encoder_layer1.blocks.0"
    assert block_of("proj.input") == ""


def test_per_channel_weights_and_recomputed_dobi_on_a_small_model():
    """Per-channel bounds: in-range counted per channel, drawn as the envelope; DOBI recomputed."""
    from calib.dobi import search_bounds
    from calib.report.stats import DobiOptions, Bounds
    from toolchain.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)),
                           QuantConfig(quantize=("linear",), weight_granularity="per-channel"),
                           torch.rand(1, 6, generator=torch.Generator().manual_seed(0)))  # placement's example
    for q in quantizers(model).values():  # deliberately tight bounds: something is clipped everywhere
        width = 0.02 if q.kind == "weight" else 0.5
        q.set_bounds(torch.full(q.bounds_shape, -width), torch.full(q.bounds_shape, width))
    inputs = torch.randn(64, 6)
    stats = collect_stats(model, lambda m: [m(part) for part in inputs.split(16)], "final",
                          {"final": bound_specs(model)}, DobiOptions(bins=512))
    by_name = {s.name: s for s in stats}
    weight = model[0].weight.detach()
    s = by_name["0.weight"]
    step, zero = grid.step_and_zero_point(torch.full((8, 1), -0.02), torch.full((8, 1), 0.02), 4)
    codes = torch.round(weight / step)
    assert s.final.inside == float(((codes >= -zero) & (codes <= 15 - zero)).sum()) / weight.numel()
    lower, upper = search_bounds(weight, 4, "both", axis=0)
    assert torch.equal(s.dobi.lower, lower) and torch.equal(s.dobi.upper, upper) and s.dobi.exact
    lines = {line.get_gid(): line.get_xdata()[0] for line in figures.quantizer_figure(s).axes[0].get_lines()}
    assert lines["dobi-lower"] == float(lower.min()) and lines["dobi-upper"] == float(upper.max())
    assert figures.envelope(Bounds(lower, upper, 1.0)) == (float(lower.min()), float(upper.max()))
    hidden = by_name["2.input"]  # GELU output: DOBI's one-sided search keeps the minimum
    assert hidden.role == "mlp_hidden" and float(hidden.dobi.lower) == pytest.approx(hidden.minimum)
    assert not hidden.dobi.exact and 0.0 < hidden.final.inside < 1.0
