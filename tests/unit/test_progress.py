"""The run's progress: a live bar on a terminal, plain periodic lines otherwise."""

import io

from cflow.run import ProgressReporter
from cflow.scheduler import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_one_redrawn_bar_line():
    out = Terminal()
    reporter = ProgressReporter(out)
    reporter.show(Progress(total=4, done=1, running=2, vms={"RUNNING": 2}), 10.0)
    reporter.show(Progress(total=4, done=2, running=2, vms={"RUNNING": 2}), 20.0)
    reporter.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[############............] 20 s done 2/4" in text
    assert "~20 s left" in text  # 20 s for 2 done, 2 left


def test_pipe_gets_plain_lines_at_most_every_ten_seconds_and_the_last():
    out = io.StringIO()
    reporter = ProgressReporter(out)
    for second in range(25):
        reporter.show(Progress(total=5, done=min(5, second // 5)), float(second))
    reporter.show(Progress(total=5, done=5), 25.5)
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0].strip("[ ") for line in lines] == ["0 s", "10 s", "20 s", "26 s"]
    assert "\r" not in out.getvalue()
    assert lines[-1].endswith("VMs: none") and "done 5/5" in lines[-1]
