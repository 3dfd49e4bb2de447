"""The CPU measurement of LED's eager forms (benchmarks/cpu_led.py), at small shapes."""

import os
import subprocess
import sys
from pathlib import Path


def test_reports_both_forms_and_skips_what_cannot_fit(tmp_path):
    out = tmp_path / "cpu-led.md"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    # 2 x 100,000 labels: the vectorized form would need about 1043 GiB of relation tensors.
    subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_led.py"), "--shapes", "8x20x32,2x100000x2",
                    "--repeats", "1", "--out", str(out)], check=True, env=env, timeout=300)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[:2] for r in rows[1:]] == [["| 8x20x32", "grouped"], ["| 8x20x32", "vectorized"],
                                         ["| 2x100000x2", "grouped"], ["| 2x100000x2", "vectorized"]]
    small = [r for r in rows[1:] if r[0] == "| 8x20x32"]
    assert all(float(r[2]) > 0 for r in small)
    losses = [float(r[4].rstrip(" |")) for r in small]
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    assert rows[4][2].startswith("skipped: about 1043 GiB")
    assert float(rows[3][2]) > 0
