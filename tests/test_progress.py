"""gblr.system.progress: a bar on a terminal, log lines in a log file, the items unchanged either way."""
import io
import logging
import sys

from gblr.system.progress import interactive, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_log_file_progress_logs_lines_and_yields_every_item(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not interactive()
    with caplog.at_level(logging.INFO, logger="gblr"):
        assert list(progress(range(3), "evaluate", every_s=0)) == [0, 1, 2]
        assert list(progress(iter("ab"), "tokenize", every_s=0)) == ["a", "b"]
        assert list(progress(range(1000), "quick")) == list(range(1000))  # no line before every_s seconds
    lines = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert lines == ["evaluate: 1/3", "evaluate: 2/3", "evaluate: 3/3", "tokenize: 1/?", "tokenize: 2/?"]


def test_on_a_terminal_progress_draws_a_bar_instead_of_logging(monkeypatch, caplog):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert interactive()
    with caplog.at_level(logging.INFO, logger="gblr"):
        assert list(progress(range(3), "evaluate", every_s=0)) == [0, 1, 2]
    assert not caplog.records and "evaluate" in terminal.getvalue()
