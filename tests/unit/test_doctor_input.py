"""`sharpen doctor` given a bad job file or a bad --master: exit 2 and one message, before any check."""

from __future__ import annotations

from support.e2e import sharpen


def test_bad_job_file_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: m}\nresources: {gpus_per_node: 0}\n")
    result = sharpen("doctor", str(bad), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "gpus_per_node" in result.stderr and "Traceback" not in result.stderr
    result = sharpen("doctor", "--master", "no-port-here", timeout=120)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr
