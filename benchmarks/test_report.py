"""The report command on a small, hand-made pytest-benchmark JSON."""

import json

import pytest

import report


def _bench(form, median, shape="coco", loss="led", pass_="fwd+bwd", floor_us=10.0, peak=5.0, dtype="torch.float32"):
    info = dict(loss=loss, form=form, shape=shape, B=64, C=80, D=768, dtype=dtype, pass_=pass_,
                floor_us=floor_us, peak_extra_mib=peak, device="Test GPU", torch="2.x")
    return dict(name=f"test_{loss}[{form}]", extra_info=info, stats=dict(median=median))


@pytest.fixture
def results(tmp_path):
    data = dict(
        datetime="2026-01-01T00:00:00", commit_info=dict(id="0123456789abcdef"), l2d_copy_tbps=3.0,
        benchmarks=[_bench("fused-triton", 40e-6), _bench("eager-vectorized", 3e-3), _bench("torch.compile", 1.2e-3),
                    _bench("eager-loops", 0.2)]
        + [_bench(form, t, shape="r101-to-r34", loss="step", pass_="train step", floor_us=None, dtype="bf16-autocast")
           for form, t in (("bce-only", 0.030), ("eager-authors", 0.160), ("fused-triton", 0.0303))],
        l2d_unmeasured=[dict(loss="led", form="eager-vectorized", shape="openimages", B=16, C=9605, D=256,
                             dtype="torch.float32", pass_="fwd+bwd", status="out of memory")],
    )
    path = tmp_path / "bench-test.json"
    path.write_text(json.dumps(data))
    return path


def test_markdown_has_medians_ratios_floor_and_unmeasured_cases(results, tmp_path):
    report.main([str(results), "--out", str(tmp_path), "--no-plot"])
    text = (tmp_path / "bench-test.md").read_text()
    assert "Test GPU" in text and "3.00 TB/s" in text
    assert "40.0 us [5 MiB]" in text and "3.00 ms [5 MiB]" in text
    assert "| 75x | 30x | 5000x | 25% |" in text  # 3 ms / 40 us, 1.2 ms / 40 us, 0.2 s / 40 us, 10 us / 40 us
    assert "out of memory" in text


def test_plot_is_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    report.main([str(results), "--out", str(tmp_path)])
    png = tmp_path / "bench-test.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_markdown_gives_the_losses_share_of_a_training_step(results, tmp_path):
    report.main([str(results), "--out", str(tmp_path), "--no-plot"])
    text = (tmp_path / "bench-test.md").read_text()
    assert "| eager-authors | 160.00 ms | 130.00 ms (unpaired) | 81.2% | 1.00x |" in text  # (160 - 30) / 160
    assert "| fused-triton | 30.30 ms | 300.0 us (unpaired) | 1.0% | 5.28x |" in text  # (30.3 - 30) / 30.3, 160 / 30.3


def test_a_step_timed_in_paired_rounds_reports_the_paired_cost(results, tmp_path):
    data = json.loads(results.read_text())
    step = next(b for b in data["benchmarks"] if b["extra_info"]["loss"] == "step"
                and b["extra_info"]["form"] == "fused-triton")
    step["stats"]["median"] = 0.040  # drifted rounds: 10 ms above the BCE-only median of 30 ms
    step["extra_info"]["paired_losses_s"] = 0.0004  # the BCE-only steps beside them drifted alike
    results.write_text(json.dumps(data))
    report.main([str(results), "--out", str(tmp_path), "--no-plot"])
    text = (tmp_path / "bench-test.md").read_text()
    assert "| fused-triton | 40.00 ms | 400.0 us | 1.0% | 4.00x |" in text
    assert "| bce-only | 30.00 ms | - | - |" in text


def test_split_runs_are_merged_into_one_report(results, tmp_path):
    data = json.loads(results.read_text())
    first, second = dict(data, benchmarks=data["benchmarks"][:2]), dict(data, benchmarks=data["benchmarks"][2:])
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = tmp_path / "out" / "bench-merged.json"
    (tmp_path / "killed.json").write_text("")  # a pytest run killed after opening its JSON
    report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "missing.json"),
                 str(tmp_path / "killed.json"), "--merged", str(merged), "--no-plot"])
    assert len(json.loads(merged.read_text())["benchmarks"]) == len(data["benchmarks"])
    assert "| 75x | 30x | 5000x | 25% |" in (tmp_path / "out" / "bench-merged.md").read_text()


def test_graphed_forms_get_their_own_floor_and_leave_the_ratios_to_eager_calls(results, tmp_path):
    data = json.loads(results.read_text())
    data["benchmarks"].append(_bench("fused-triton+graph", 20e-6, peak=5.0))
    results.write_text(json.dumps(data))
    report.main([str(results), "--out", str(tmp_path), "--no-plot"])
    text = (tmp_path / "bench-test.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| shape") and "eager-loops" in line)
    assert header.index("fused-triton") < header.index("fused-triton+graph") < header.index("torch.compile")
    assert header.endswith("| floor | floor, graphed |")
    # Ratios from the eager fused call (40 us), the graphed floor from the replay (10 us / 20 us).
    assert "| 20.0 us [5 MiB] |" in text and "| 75x | 30x | 5000x | 25% | 50% |" in text


def test_targets_table_reads_each_target_per_fused_form(tmp_path):
    benches = [_bench("fused-triton", 40e-6), _bench("fused-triton+graph", 20e-6), _bench("torch.compile", 1.2e-3),
               _bench("eager-loops", 0.2), _bench("fused-triton", 350e-6, shape="c1000", peak=120.0),
               _bench("fused-triton", 60e-6, loss="mld", shape="coco"),
               _bench("torch.compile", 0.22e-3, loss="mld", shape="coco"),
               _bench("fused-triton+graph", 30e-6, loss="mld", shape="b4096-c1000", floor_us=27.0)]
    benches[4]["extra_info"].update(B=32, C=1000, D=768)
    path = tmp_path / "bench-targets.json"
    path.write_text(json.dumps(dict(benchmarks=benches)))
    report.main([str(path), "--out", str(tmp_path), "--no-plot"])
    text = (tmp_path / "bench-targets.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines()
            if line.startswith(("| LED", "| MLD"))}
    assert "| fused-triton | fused-triton+graph |" in text
    assert rows["LED 64 x 80 x 768: at most 60 us"].endswith("| 40.0 us (met) | 20.0 us (met) |")
    assert rows["LED 64 x 80 x 768: 20x faster than torch.compile"].endswith("| 30x (met) | 60x (met) |")
    assert rows["LED 64 x 80 x 768: 2000x faster than the authors' loops"].endswith("| 5000x (met) | 10000x (met) |")
    assert rows["LED 32 x 1000 x 768: at most 300 us"].endswith("| 350.0 us (missed) | - |")
    # 120 MiB against a 93.75 MiB gradient: 1.28x; the replay reads the eager call's peak.
    assert rows["LED 32 x 1000 x 768: peak extra memory at most 1.25x the gradient"].endswith(
        "| 120 MiB (1.28x) (missed) | 120 MiB (1.28x) (missed) |")
    assert rows["LED 16 x 9605 x 256: at most 1 ms"].endswith("| - | - |")  # not in this run
    assert rows["MLD 64 x 80: 5x faster than torch.compile"].endswith("| 3.67x (missed) | - |")
    assert "| - | 1.11x (met) |" in rows[next(r for r in rows if r.startswith("MLD 4096"))]
