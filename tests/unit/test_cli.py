"""The entry points' glue in-process: exit codes and one-line errors, the verbose switch
read as OmegaConf reads booleans, renamed keys named on refusal."""

from __future__ import annotations

import sys

import pytest

from ptycho import cli
from ptycho.cli import CONF, precheck, run_job
from ptycho.config import register_configs
from ptycho.data import ScanFileError
from ptycho.errors import ConfigError


def test_run_job_maps_errors_to_exit_codes(capsys):
    def raise_(error):
        def fn():
            raise error

        return fn

    for error, code in (
        (ConfigError("bad field"), 2),
        (ScanFileError("x.npz: broken"), 1),
        (RuntimeError("boom\nsecond line"), 1),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_job(raise_(error))
        assert exit_info.value.code == code
        assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit):
        run_job(raise_(KeyError()))  # no message: the error's type names it
    assert capsys.readouterr().err.strip() == "error: KeyError"
    with pytest.raises(SystemExit) as exit_info:
        run_job(raise_(KeyboardInterrupt()))  # Ctrl-C outside training's own handling
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: Ctrl-C")


@pytest.mark.parametrize(
    ("argv", "restarts"),
    [
        (["train.py", "verbose=true"], True),
        (["train.py", "verbose=True"], True),  # what a "verbose=true" in sys.argv missed
        (["train.py", "verbose=YES"], True),
        (["train.py", "debug=smoke", "verbose=1"], True),
        (["train.py", "verbose=false"], False),
        (["train.py", "debug=verbose=true"], False),
        (["train.py"], False),
    ],
)
def test_verbose_restarts_with_everything_shown(monkeypatch, argv, restarts):
    calls = []
    environ = {k: v for k, v in cli.os.environ.items() if k != "PTYCHO_VERBOSE"}
    monkeypatch.setattr(cli.os, "environ", environ)  # restored after the test
    monkeypatch.setattr(cli.os, "execv", lambda path, args: calls.append(args))
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, *argv])
    cli._show_everything_if_verbose(argv)
    assert bool(calls) is restarts
    if restarts:
        assert calls == [[sys.executable, *argv]]
        assert environ["PTYCHO_VERBOSE"] == "1"


def test_a_renamed_key_is_refused_with_its_new_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        register_configs()
        precheck(CONF, "train", ["infer_batch_size=8"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: infer_batch_size is now reconstruct.batch_size: pass reconstruct.batch_size=..."
    )


def test_several_workers_label_every_line_of_their_logs(monkeypatch):
    """The workers of one run append to one ``<job>.log``: each line names its worker,
    in the handler's own format; one worker's lines stay as they were."""
    import io
    import logging
    from types import SimpleNamespace

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] - %(message)s"))
    monkeypatch.setattr(root, "handlers", [handler])  # pytest's own handlers untouched
    cli.label_worker_logs(SimpleNamespace(workers=1, worker=0))
    cli.label_worker_logs(None)
    logging.getLogger("ptycho.test").warning("alone")
    for _ in range(2):  # labelled once however often it is asked
        cli.label_worker_logs(SimpleNamespace(workers=2, worker=1))
    logging.getLogger("ptycho.test").warning("shared %d", 7)
    assert stream.getvalue().splitlines() == [
        "[WARNING] - alone",
        "[worker 1][WARNING] - shared 7",
    ]
