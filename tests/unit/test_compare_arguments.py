"""`sharpen compare`'s argument errors (exit 2, one message). Its table and picture over real runs:
tests/ranks/test_run.py (test_accumulation_and_micro_batch_do_not_change_the_losses)."""

from __future__ import annotations

from launcher.cli import main


def test_one_run_is_a_mistake(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: compare needs two or more run directories, got one: {tmp_path}\n"
        f"  hint: one run's curves and figures are in {tmp_path / 'report.png'} and {tmp_path / 'report.md'}\n"
    )


def test_a_path_that_is_not_a_run_dir_is_named(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    out = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"error: not a sharpen run directory (no plan.json): {tmp_path / 'a'}, {tmp_path / 'missing'}"
    )
    assert not out.exists()
