"""bench/bench_preprocess.py runs on the CPU and reports what it claims to (the timings
themselves are the benchmark's business, never asserted here)."""
import json

from bench import bench_preprocess
from tests.train_fixtures import pointing_set, tiny_checkpoint


def test_bench_runs_and_reports(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    data, _ = pointing_set(tmp_path / "set", 3, size=(112, 112))
    report = bench_preprocess.main(["--quick", "--out", str(tmp_path / "out"),
                                    "--sizes", "640x480,4032x3024", "--answers", str(ckpt),
                                    "--data", str(data), "--examples", "3", "--upscale", "8"])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "preprocess.json").read_text())
    assert saved["sizes"].keys() == report["sizes"].keys() == {"640x480", "4032x3024"}
    big = report["sizes"]["4032x3024"]
    for key in ("decode", "decode_fast", "python", "native"):
        assert big[key]["p20_ms"] <= big[key]["p50_ms"] <= big[key]["p80_ms"]
    # Fast decode applies to the 12 MP photo only (640x480 needs its full size).
    assert big["fast_decode_pixels"][0] < 3024 and big["fast_decode_error"]["max"] > 0
    small = report["sizes"]["640x480"]
    assert small["fast_decode_pixels"] == [480, 640] and small["fast_decode_error"]["max"] == 0
    answers = report["answers"]
    assert answers["examples"] == 3 and 0 <= answers["changed"] <= 3
    assert answers["stored_size"] == [896, 896] and answers["fast_decoded_hw"][0] < 896
    assert "speedup" in printed and "fast decode changed" in printed
