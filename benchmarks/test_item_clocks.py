"""item_clocks.py: the per-item clock lines of the CUDA LED slice launches, read back."""

from item_clocks import main, parse, summarize

LINES = """# 4 3 256 2
0 0 1 100 50 2
0 1 2 100 10 3
# 4 3 256 2
0 0 1 1000 400 20
0 1 1 2000 300 3
0 2 2 1500 100 -70
1 0 1 3000 900 40
""".splitlines()


def test_parse_keeps_calls_apart():
    calls = parse(LINES)
    assert [c["shape"] for c in calls] == [(4, 3, 256, 2), (4, 3, 256, 2)]
    assert len(calls[0]["items"]) == 2 and calls[1]["items"][2] == (0, 2, 2, 1500, 100, -70)


def test_summary_names_the_busiest_sm_and_the_tiles():
    text = "\n".join(summarize(parse(LINES)[-1], ns_per_cycle=0.5))
    assert "launch 0, Grams (both families): 3 items on 2 SMs" in text
    assert "busiest SM 2 items, 700 cycles (mean SM 400)" in text  # SM 1: 400 + 300; SM 2: 100
    assert "slowest item 0 (group of 20): 400 cycles, 0.2 us" in text
    # Ends at 0.5 ns a cycle: 1200, 2150, 1550; from 1000 to 2150: 1.15 us. SMs busy 200 ns on
    # average (700 and 100 cycles); last ends 2150 (SM 1) and 1550 (SM 2), median 1850.
    assert "first start to last end 1.1 us; SMs busy 17% of it on average" in text
    assert "the median SM's last item ends 0.3 us before the last" in text
    # SM 1's items: the first ends at 1000 + 400 * 0.5 = 1200, the second starts at 2000: 800 ns.
    assert "between a block's items: median 800 ns, max 800 ns (1 hand-overs)" in text
    assert "32 rows: 1 items" in text and "16 rows: 1 items" in text and "passed over: 1 items" in text
    assert "launch 1, CD weights and gradient: 1 items on 1 SMs" in text and "64 rows: 1 items" in text
    assert "launch 2" not in text


def test_main_reads_a_file(tmp_path, capsys):
    path = tmp_path / "clocks.txt"
    path.write_text("\n".join(LINES) + "\n")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("4 x 3 x 256") == 1 and "3 items on 2 SMs" in out  # the last call of the shape
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([str(empty)]) == 1
