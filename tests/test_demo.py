"""demo.py's verdict: read from the evaluation report, per reference mode."""

import json

import demo


def _report(tmp_path, modes):
    first = next(iter(modes.values()))
    report = {
        "sync": {
            "correlation": first["sync"],
            "control_correlation": first["sync_control"],
            "expert_calibration": 0.97,
            "vqgan_ceiling": 0.6,
        },
        "modes": modes,
    }
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    return demo.summary(tmp_path, {"render": 10.0, "dit": 20.0}, [["render"], ["dit"]])


def test_verdict_names_the_default_mode_the_widest_margin_and_who_meets_the_bar(tmp_path):
    text = _report(
        tmp_path,
        {
            "x0_same_step": {"sync": 0.55, "sync_control": 0.05},
            "fixed": {"sync": 0.85, "sync_control": 0.40},
            "final": {"sync": 0.82, "sync_control": 0.10},
        },
    )
    assert "(x0_same_step references; the unguided rows are in the table below): " in text
    assert "correlation **0.550**" in text
    assert "widest margin over the control: final, 0.820 against 0.100" in text
    # fixed clears 0.8 but only 0.45 above its control; final clears both.
    assert "**met by final**" in text
    assert "| **wall time** (stages joined by + ran side by side) | 30 |" in text


def test_verdict_when_no_mode_meets_the_bar(tmp_path):
    text = _report(tmp_path, {"x0_same_step": {"sync": 0.41, "sync_control": 0.02}})
    assert "**not met**" in text and "widest margin over the control: x0_same_step" in text


def test_fidelity_line_names_round_trip_generated_and_the_lse_expert():
    report = {
        "metrics": {"psnr": 16.0, "psnr_lower": 18.4, "lse_c": 0.231, "lse_d": 0.657},
        "round_trip": {"psnr_lower": 21.9},
        "settings": {"lse_expert": "trained expert demo/sync_expert"},
    }
    text = demo.fidelity(report)
    assert "round trips 21.9 dB, generated 18.4 dB (whole generated crop 16.0 dB)" in text
    assert "LSE-C 0.231, LSE-D 0.657 (trained expert demo/sync_expert;" in text
    assert "LSE" not in demo.fidelity({"metrics": {"lse_c": None}})
    assert "n/a" in demo.fidelity({})


def test_interpolation_table_puts_the_interpolated_rows_beside_the_plain_one(tmp_path):
    row = {"jitter": 1.8, "flicker": 0.9, "sync": 0.8, "psnr_lower": 20.0, "s_per_frame": 1.0}
    report = {"modes": {"x0_same_step w=2": row, "fixed w=2": row}}
    assert demo.interpolation(tmp_path, report) == []  # no report_vfi: no table
    vfi = {"x0_same_step w=2 +smooth": row | {"jitter": 1.2},
           "x0_same_step w=2 +half_rate": row | {"s_per_frame": 0.5, "sync": None}}  # fmt: skip
    (tmp_path / "report_vfi").mkdir()
    (tmp_path / "report_vfi" / "report.json").write_text(json.dumps({"modes": vfi}))
    table = "\n".join(demo.interpolation(tmp_path, report))
    assert "| x0_same_step w=2 | 1.800 | 0.900 | 0.800 | 20.000 | 1.000 |" in table
    assert "| x0_same_step w=2 +smooth | 1.200 |" in table
    assert "| x0_same_step w=2 +half_rate | 1.800 | 0.900 | n/a | 20.000 | 0.500 |" in table
    assert "fixed" not in table
